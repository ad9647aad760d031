"""The main job end to end with the shipped models and the real validators.

``dicom-ai replay sample_studies/`` runs once per module with every bundle in ``models/``;
then every object it wrote must pass ``dciodvfy`` (no "Error" line), each study's source and
outputs must pass ``dcentvfy``, the SR read back with highdicom must carry the probabilities of
``findings.json``, and the 308-file corpus must be accounted for file by file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from dicom_ai.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_studies"
CORPUS = REPO.parent / "shared" / "data" / "dicom"
SHIPPED = ("cxr-pneumonia", "fundus-dr", "ct-lung", "derm-lesion", "xr-fracture")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None,
                       reason="dicom3tools (dciodvfy, dcentvfy) needed"),
]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in SHIPPED:
        assert (REPO / "models" / name / "models" / "model.pt").is_file(), f"{name} not shipped"
    out = tmp_path_factory.mktemp("replay")
    status = main(["replay", str(SAMPLES), "--out", str(out), "--models", str(REPO / "models"),
                   "--quiet"])
    assert status == 0
    return out


def documents(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/findings.json"))]


def results_by_model(out: Path) -> dict[str, list[dict[str, Any]]]:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for document in documents(out):
        for result in document["results"]:
            by_model.setdefault(result["model"]["name"], []).append(result)
    return by_model


def test_every_cxr_and_fundus_study_gets_findings(replayed: Path) -> None:
    by_model = results_by_model(replayed)
    # The hand radiograph (a CR too) is the fracture detector's: see the fracture test.
    chest = by_model["cxr-pneumonia"]
    assert len(chest) == 4
    assert len(by_model["fundus-dr"]) == 3
    for result in chest + by_model["fundus-dr"]:
        assert result["status"] == "ok", result.get("reason")
        assert all(0.0 <= f["probability"] <= 1.0 for f in result["findings"])
    assert [f["label"] for f in by_model["cxr-pneumonia"][0]["findings"]] == \
        ["normal", "pneumonia"]
    assert [f["label"] for f in by_model["fundus-dr"][0]["findings"]] == \
        [f"dr_grade_{i}" for i in range(5)] + ["referable_dr"]
    (ct,) = by_model["ct-lung"]
    labels = {f["label"] for f in ct["findings"]}
    assert {"lung_volume_left_ml", "lung_volume_right_ml", "mean_lung_density_hu",
            "laa950_percent"} <= labels


def test_fracture_radiograph_gets_a_box_and_chest_films_do_not(replayed: Path) -> None:
    by_model = results_by_model(replayed)
    (fracture,) = [r for r in by_model["xr-fracture"] if r["status"] == "ok"]
    image_level = fracture["findings"][0]
    assert image_level["label"] == "fracture" and image_level["positive"] is True
    boxes = [f for f in fracture["findings"] if "bbox_px" in f]
    assert boxes and all(f["label"] == "fracture" and 0.0 <= f["probability"] <= 1.0
                         for f in boxes)
    # The radiologists' box of FracAtlas train/IMG0003233.jpg is [216.7, 177.4, 255.6, 198.6]
    # (sample_studies/README.md): the top box's centre lies inside it.
    c0, r0, c1, r1 = boxes[0]["bbox_px"]
    assert 216.7 <= (c0 + c1) / 2 <= 255.6 and 177.4 <= (r0 + r1) / 2 <= 198.6
    # Each model stays out of the other's films: no "not analysed" result, no SR for them.
    assert len(by_model["xr-fracture"]) == 1
    left_out = [(e["model"]["name"], e["reason"]) for d in documents(replayed)
                for e in d["routed_elsewhere"]]
    assert sorted(name for name, _ in left_out) == ["cxr-pneumonia"] + ["xr-fracture"] * 4
    assert all(("HAND" if name == "cxr-pneumonia" else "CHEST") in reason
               for name, reason in left_out)


def test_summary_accounts_for_every_file(replayed: Path) -> None:
    entries = json.loads((replayed / "replay-summary.json").read_text())
    dicom_files = list(SAMPLES.rglob("*.dcm"))
    assert {e["path"] for e in entries if e["status"] == "processed"} == \
        {str(p) for p in dicom_files}


def validator_errors(*args: str | Path) -> list[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TCP_NODELAY": "1"}, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def test_every_output_passes_dciodvfy(replayed: Path) -> None:
    outputs = sorted(replayed.glob("*/*.dcm"))
    assert len(outputs) >= 2 * 8
    for path in outputs:
        assert validator_errors("dciodvfy", path) == [], path.name


def test_each_study_is_consistent_with_its_sources(replayed: Path) -> None:
    sources: dict[str, list[Path]] = {}
    for entry in json.loads((replayed / "replay-summary.json").read_text()):
        sources.setdefault(entry["study_instance_uid"], []).append(Path(entry["path"]))
    for study_dir in sorted(p for p in replayed.iterdir() if p.is_dir()):
        outputs = sorted(study_dir.glob("*.dcm"))
        assert validator_errors("dcentvfy", *sources[study_dir.name], *outputs) == []


def test_every_dermoscopy_study_gets_the_three_classes_and_a_decision(replayed: Path) -> None:
    results = results_by_model(replayed)["derm-lesion"]
    assert len(results) == 3 and all(r["status"] == "ok" for r in results)
    for result in results:
        by_label = {f["label"]: f for f in result["findings"]}
        assert set(by_label) == {"melanoma", "nevus", "seborrheic_keratosis", "malignant"}
        # findings.json rounds each probability to 6 decimals: three of them may sum to 1 ± 1.5e-6.
        assert sum(by_label[k]["probability"]
                   for k in ("melanoma", "nevus", "seborrheic_keratosis")) == pytest.approx(
            1.0, rel=0, abs=1.5e-6)
        assert by_label["malignant"]["probability"] == by_label["melanoma"]["probability"]
        assert by_label["malignant"]["positive"] == (
            by_label["malignant"]["probability"] >= by_label["malignant"]["operating_point"])


def test_sr_probabilities_equal_findings_json(replayed: Path) -> None:
    checked = 0
    for document in documents(replayed):
        study_dir = replayed / document["study_instance_uid"]
        for result in document["results"]:
            if result["model"]["name"] == "ct-lung":
                continue
            (sr_name,) = [n for n in result["outputs"] if n.startswith("sr-")]
            sr = hd.sr.srread(study_dir / sr_name)
            probabilities = sorted(
                float(m.value)
                for group in sr.content.get_image_measurement_groups()
                for m in group.get_measurements(name=codes.DCM.Probability))
            expected = sorted(f["probability"] for f in result["findings"])
            assert probabilities == pytest.approx(expected, abs=1e-6)
            checked += 1
    # Every non-CT result of the samples: 4 chest films by cxr-pneumonia, the hand film by
    # xr-fracture, 3 fundus, 3 dermoscopy.
    assert checked == 11


def test_corpus_replay_accounts_for_every_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if not CORPUS.is_dir():
        pytest.skip("../shared/data/dicom not present")
    status = main(["replay", str(CORPUS), "--out", str(tmp_path), "--models",
                   str(REPO / "models"), "--quiet"])
    entries = json.loads((tmp_path / "replay-summary.json").read_text())
    corpus_files = [p for p in CORPUS.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {e["path"] for e in entries} == {str(p) for p in corpus_files}
    assert all(e["reason"] for e in entries if e["status"] != "processed")
    assert status == (2 if any(e["status"] == "failed" for e in entries) else 0)
    assert "Traceback" not in capsys.readouterr().err


def test_frontal_and_lateral_study_gets_one_valid_sr(tmp_path: Path) -> None:
    import pydicom

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLES / "cxr01" / "1.dcm", folder / "frontal.dcm")
    lateral = pydicom.dcmread(SAMPLES / "cxr01" / "1.dcm")
    lateral.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7701"
    lateral.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.7701.1"
    lateral.SeriesNumber = 2
    lateral.ViewPosition = "LL"
    lateral.save_as(folder / "lateral.dcm")
    out = tmp_path / "out"
    assert main(["replay", str(folder), "--out", str(out), "--models", str(REPO / "models"),
                 "--quiet"]) == 0
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    srs = sorted(study_dir.glob("sr-*.dcm"))
    # One SR: cxr-pneumonia's holds the frontal finding and the lateral's "not analysed";
    # xr-fracture, which does not read chest films, stays out of the study.
    document = json.loads((study_dir / "findings.json").read_text())
    assert [r["model"]["name"] for r in document["results"]] == ["cxr-pneumonia"] * 2
    assert {e["model"]["name"] for e in document["routed_elsewhere"]} == {"xr-fracture"}
    assert len(srs) == 1
    outputs = sorted(study_dir.glob("*.dcm"))
    for path in outputs:
        assert validator_errors("dciodvfy", path) == [], path.name
    assert validator_errors("dcentvfy", folder / "frontal.dcm", folder / "lateral.dcm",
                            *outputs) == []
