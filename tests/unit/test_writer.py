"""One writer for replay and the service: names, order, durability, findings.json last."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dicom_ai.results import build_outputs, findings_document, output_filename
from dicom_ai.results.writer import FINDINGS_NAME, write_results
from tests import results_fixtures as fx


def test_every_output_named_in_findings_json_exists(tmp_path: Path) -> None:
    results = [fx.ct_result()]
    datasets = build_outputs(results, fx.settings(), codes=fx.CODES, finding_site=fx.LUNG)
    document = findings_document(results[0].series.study_instance_uid, results)
    folder = tmp_path / "study"
    paths = write_results(folder, datasets, document)
    assert [p.name for p in paths] == [output_filename(d) for d in datasets]
    assert [p.name[:3] for p in paths] == ["sc-", "seg", "sr-"]
    written = json.loads((folder / FINDINGS_NAME).read_text(encoding="utf-8"))
    named = [n for r in written["results"] for n in r["outputs"]]
    assert named == [p.name for p in paths]
    assert all((folder / n).is_file() for n in named)
    for path, ds in zip(paths, datasets, strict=True):
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    # Nothing but the results: no partial files left behind.
    assert sorted(p.name for p in folder.iterdir()) == sorted([*named, FINDINGS_NAME])


def test_a_rewrite_replaces_the_files_in_place(tmp_path: Path) -> None:
    result = fx.dx_result()
    datasets = build_outputs([result], fx.settings(), codes=fx.CODES, finding_site=fx.LUNG)
    first = write_results(tmp_path, datasets, {"a": 1})
    again = write_results(tmp_path, datasets, {"a": 2})
    assert first == again
    assert json.loads((tmp_path / FINDINGS_NAME).read_text()) == {"a": 2}
    assert len(list(tmp_path.iterdir())) == len(first) + 1


def test_chinese_text_is_written_as_utf8(tmp_path: Path) -> None:
    write_results(tmp_path, [], {"impression": "AI 起草的印象"})
    assert "起草" in (tmp_path / FINDINGS_NAME).read_text(encoding="utf-8")


def test_an_invalid_uid_writes_nothing(tmp_path: Path) -> None:
    result = fx.dx_result()
    datasets = build_outputs([result], fx.settings(), codes=fx.CODES, finding_site=fx.LUNG)
    datasets[-1].SOPInstanceUID = "1.2/../../3"
    with pytest.raises(ValueError, match="invalid SOP Instance UID"):
        write_results(tmp_path / "out", datasets, {})
    assert not (tmp_path / "out").exists()
