"""Replay end to end with a tiny bundle: findings.json, summary, exit status, no identity logged."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_ai.cli import main
from dicom_ai.config import Settings
from dicom_ai.inference.bundle import load_bundle
from dicom_ai.replay import EXIT_CANNOT_RUN, EXIT_OK, EXIT_SOME_FAILED, replay
from tests.bundles import write_bundle

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CXR = REPO / "sample_studies" / "cxr01" / "1.dcm"
SECRETS = ("Secretname^Patient", "PID-SECRET-4711", "19010203")


@pytest.fixture
def cxr_folder(tmp_path: Path) -> Path:
    if not SAMPLE_CXR.exists():
        pytest.skip("sample_studies not built")
    folder = tmp_path / "in"
    folder.mkdir()
    ds = pydicom.dcmread(SAMPLE_CXR)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRETS
    ds.save_as(folder / "cxr.dcm")
    return folder


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_bundle(root)
    return root


def test_replay_writes_findings_outputs_and_summary(cxr_folder: Path, models_dir: Path,
                                                    tmp_path: Path) -> None:
    bundle = load_bundle(models_dir / "tiny-cxr", device=torch.device("cpu"))
    out = tmp_path / "out"
    report = replay(cxr_folder, out, [bundle], Settings(), progress=False)
    assert report.exit_status == EXIT_OK
    study_uid = pydicom.dcmread(cxr_folder / "cxr.dcm").StudyInstanceUID
    document = json.loads((out / study_uid / "findings.json").read_text())
    (result,) = document["results"]
    assert result["status"] == "ok"
    assert [f["label"] for f in result["findings"]] == ["normal", "pneumonia"]
    probabilities = [f["probability"] for f in result["findings"]]
    assert np.isclose(sum(probabilities), 1.0, atol=1e-5)
    assert result["outputs"] and all((out / study_uid / name).is_file()
                                     for name in result["outputs"])
    summary = json.loads((out / "replay-summary.json").read_text())
    assert summary == [{"path": str(cxr_folder / "cxr.dcm"), "status": "processed",
                        "reason": None, "study_instance_uid": study_uid}]


def test_lateral_view_is_rejected_without_findings(cxr_folder: Path, models_dir: Path,
                                                   tmp_path: Path) -> None:
    ds = pydicom.dcmread(cxr_folder / "cxr.dcm")
    ds.ViewPosition = "LL"
    ds.save_as(cxr_folder / "cxr.dcm")
    bundle = load_bundle(models_dir / "tiny-cxr", device=torch.device("cpu"))
    report = replay(cxr_folder, tmp_path / "out", [bundle], Settings(), progress=False)
    (result,) = report.outcomes[0].results
    assert result.status == "rejected" and result.findings == []
    assert result.reason == "view position LL is not a frontal (PA/AP) view"
    assert report.entries[0]["status"] == "processed"


def test_exit_status_and_identity_never_logged(cxr_folder: Path, models_dir: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    other = pydicom.dcmread(cxr_folder / "cxr.dcm")
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    other.save_as(tmp_path / "whole.dcm")
    (cxr_folder / "truncated.dcm").write_bytes((tmp_path / "whole.dcm").read_bytes()[:5000])
    (cxr_folder / "notes.txt").write_text(f"{SECRETS[0]} is not DICOM\n")
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    status = main(["--log-level", "DEBUG", "replay", str(cxr_folder), "--out", str(out),
                   "--models", str(models_dir), "--quiet"])
    assert status == EXIT_SOME_FAILED
    captured = capsys.readouterr()
    entries = {Path(e["path"]).name: e for e in
               json.loads((out / "replay-summary.json").read_text())}
    assert entries["truncated.dcm"]["status"] == "failed" and entries["truncated.dcm"]["reason"]
    assert entries["notes.txt"]["status"] == "skipped"
    assert entries["cxr.dcm"]["status"] == "processed"
    assert "1 processed, 1 skipped, 1 failed" in captured.out
    logged = captured.out + captured.err + caplog.text
    for secret in SECRETS:
        assert secret not in logged


def test_cannot_run(tmp_path: Path, cxr_folder: Path) -> None:
    assert main(["replay", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == \
        EXIT_CANNOT_RUN
    empty = tmp_path / "no-models"
    empty.mkdir()
    assert main(["replay", str(cxr_folder), "--out", str(tmp_path / "o"), "--models",
                 str(empty)]) == EXIT_CANNOT_RUN


def test_replay_twice_gives_identical_uids(cxr_folder: Path, models_dir: Path,
                                           tmp_path: Path) -> None:
    bundle = load_bundle(models_dir / "tiny-cxr", device=torch.device("cpu"))
    first = replay(cxr_folder, tmp_path / "a", [bundle], Settings(), progress=False)
    second = replay(cxr_folder, tmp_path / "b", [bundle], Settings(), progress=False)
    uids = [[ds.SOPInstanceUID for ds in o.datasets] for o in (first.outcomes + second.outcomes)]
    assert uids[0] == uids[1] and len(uids[0]) >= 2
    shutil.rmtree(tmp_path / "a")


def test_one_sr_per_study_and_model(cxr_folder: Path, models_dir: Path, tmp_path: Path) -> None:
    import highdicom as hd

    lateral = pydicom.dcmread(cxr_folder / "cxr.dcm")
    lateral.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    lateral.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77.1"
    lateral.ViewPosition = "LL"
    lateral.save_as(cxr_folder / "lateral.dcm")
    bundle = load_bundle(models_dir / "tiny-cxr", device=torch.device("cpu"))
    report = replay(cxr_folder, tmp_path / "out", [bundle], Settings(), progress=False)
    (outcome,) = report.outcomes
    assert sorted(r.status for r in outcome.results) == ["ok", "rejected"]
    srs = [ds for ds in outcome.datasets if ds.Modality == "SR"]
    assert len(srs) == 1
    sr_name = f"sr-{srs[0].SOPInstanceUID}.dcm"
    assert all(r.outputs[-1] == sr_name for r in outcome.results)
    sr = hd.sr.srread(tmp_path / "out" / outcome.study_instance_uid / sr_name)
    assert len(sr.content.get_image_measurement_groups()) == 2  # normal, pneumonia
    # "Not analysed" for the lateral, in the report-level Qualitative Evaluations.
    assert any("not analysed" in str(item.TextValue)
               for item in sr.content[0].ContentSequence[-1].ContentSequence
               if item.ValueType == "TEXT")
    referenced = {ref.ReferencedSOPInstanceUID
                  for item in srs[0].CurrentRequestedProcedureEvidenceSequence
                  for series in item.ReferencedSeriesSequence
                  for ref in series.ReferencedSOPSequence}
    assert lateral.SOPInstanceUID in referenced


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("study_uid", ["../../x", "/tmp/dicom-ai-escape", "..", "1.2/../../3"])
def test_identifiers_never_name_a_path_outside_out(cxr_folder: Path, models_dir: Path,
                                                   tmp_path: Path, study_uid: str) -> None:
    ds = pydicom.dcmread(cxr_folder / "cxr.dcm")
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.55"
    ds.save_as(cxr_folder / "escape.dcm")
    before = _files_under(tmp_path)
    bundle = load_bundle(models_dir / "tiny-cxr", device=torch.device("cpu"))
    out = tmp_path / "deep" / "er" / "out"
    report = replay(cxr_folder, out, [bundle], Settings(), progress=False)
    entries = {Path(e["path"]).name: e for e in report.entries}
    assert entries["escape.dcm"]["status"] == "failed"
    assert entries["escape.dcm"]["reason"] == \
        "not a valid UID (PS3.5 9.1): StudyInstanceUID (0020,000D)"
    assert entries["escape.dcm"]["study_instance_uid"] is None
    assert entries["cxr.dcm"]["status"] == "processed"
    assert report.exit_status == EXIT_SOME_FAILED
    written = _files_under(tmp_path) - before
    assert written and all(p.is_relative_to(out) for p in written), written
    assert not Path("/tmp/dicom-ai-escape").exists()


def test_write_outcome_refuses_a_study_folder_outside_out(tmp_path: Path) -> None:
    from dicom_ai.dicom.uid import InvalidUIDError
    from dicom_ai.pipeline import StudyOutcome
    from dicom_ai.replay import write_outcome

    for uid in ("../../x", str(tmp_path / "abs")):
        with pytest.raises(InvalidUIDError, match="Study Instance UID"):
            write_outcome(StudyOutcome(study_instance_uid=uid), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "abs").exists()


def test_a_top_level_item_tag_fails_its_file_not_the_run(cxr_folder: Path, models_dir: Path,
                                                         tmp_path: Path) -> None:
    other = pydicom.dcmread(cxr_folder / "cxr.dcm")
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.56"
    other.save_as(tmp_path / "x.dcm")
    data = (tmp_path / "x.dcm").read_bytes()
    at = data.index(b"\x10\x00\x10\x00PN")
    (cxr_folder / "item.dcm").write_bytes(data[:at] + b"\xfe\xff\x00\xe0" + bytes(4) + data[at:])
    out = tmp_path / "out"
    status = main(["replay", str(cxr_folder), "--out", str(out), "--models", str(models_dir),
                   "--quiet"])
    assert status == EXIT_SOME_FAILED
    entries = {Path(e["path"]).name: e for e in
               json.loads((out / "replay-summary.json").read_text())}
    assert entries["item.dcm"] == {"path": str(cxr_folder / "item.dcm"), "status": "failed",
                                   "reason": "(FFFE,E000) item tag outside a sequence",
                                   "study_instance_uid": None}
    assert entries["cxr.dcm"]["status"] == "processed"


def test_truncated_copy_is_failed_and_intact_copy_processed(cxr_folder: Path, models_dir: Path,
                                                            tmp_path: Path) -> None:
    intact = cxr_folder / "cxr.dcm"
    (cxr_folder / "a-copy.dcm").write_bytes(intact.read_bytes()[:-1000])  # sorts first
    bundle = load_bundle(models_dir / "tiny-cxr", device=torch.device("cpu"))
    report = replay(cxr_folder, tmp_path / "out", [bundle], Settings(), progress=False)
    entries = {Path(e["path"]).name: e for e in report.entries}
    assert entries["a-copy.dcm"]["status"] == "failed"
    assert entries["a-copy.dcm"]["reason"].startswith("truncated: (7FE0,0010) holds ")
    assert entries["cxr.dcm"]["status"] == "processed"
    (outcome,) = report.outcomes
    (result,) = outcome.results
    assert [i.path for i in result.series.instances] == [intact]
