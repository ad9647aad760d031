"""Which models report on a series when several apply: the one for its anatomy, or each with
its reason when none reads it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_ai.config import Settings
from dicom_ai.inference.bundle import load_bundle
from dicom_ai.replay import print_table, replay
from tests.bundles import CXR_BLOCK, write_bundle
from tests.conftest import STUDY_UID, MakeDicom

DX = "1.2.840.10008.5.1.4.1.1.1.1"
#: Model results by film, the study's findings.json, the replay table.
Routed = tuple[dict[str, list[str]], dict[str, object], str]
LIMB_BLOCK = {**CXR_BLOCK, "accepts": {**CXR_BLOCK["accepts"], "body_part_examined": ["HAND"],
                                       "reject_view_position": []}}


@pytest.fixture
def routed(tmp_path: Path, make_dicom: MakeDicom) -> Routed:
    pixels = (np.random.default_rng(0).random((40, 32)) * 255).astype(np.uint8)
    films = {"hand": {"BodyPartExamined": "HAND"},
             "lateral": {"BodyPartExamined": "CHEST", "ViewPosition": "LL"},
             "skull": {"BodyPartExamined": "SKULL"},
             "unstated": {}}
    for n, (name, attrs) in enumerate(films.items(), start=1):
        make_dicom(f"in/{name}.dcm", pixels, Modality="DX", SOPClassUID=DX,
                   SeriesInstanceUID=f"{STUDY_UID}.{n}", **attrs)
    models = tmp_path / "models"
    bundles = [load_bundle(write_bundle(models, name=name, block=block),
                           device=torch.device("cpu"))
               for name, block in (("tiny-cxr", CXR_BLOCK), ("tiny-limb", LIMB_BLOCK))]
    report = replay(tmp_path / "in", tmp_path / "out", bundles, Settings(), progress=False)
    (outcome,) = report.outcomes
    by_series: dict[str, list[str]] = {}
    for result in outcome.results:
        name = {f"{STUDY_UID}.{n}": film for n, film in enumerate(films, start=1)}[
            result.series.series_instance_uid]
        by_series.setdefault(name, []).append(f"{result.model.name} {result.status}")
    document = json.loads((tmp_path / "out" / STUDY_UID / "findings.json").read_text())
    table = io.StringIO()
    print_table(report.outcomes, report.entries, table)
    return by_series, document, table.getvalue()


def test_the_model_for_the_anatomy_reports_and_the_others_are_left_out(
        routed: Routed) -> None:
    by_series, document, _ = routed
    # The hand film is the limb model's; the lateral chest film is the chest model's, which
    # says why it did not analyse it.
    assert by_series["hand"] == ["tiny-limb ok"]
    assert by_series["lateral"] == ["tiny-cxr rejected"]
    assert document["routed_elsewhere"] == [
        {"series_instance_uid": f"{STUDY_UID}.1", "model": {"name": "tiny-cxr",
                                                            "version": "0.0.1"},
         "reason": "body part examined is HAND, the model reads CHEST"},
        {"series_instance_uid": f"{STUDY_UID}.2", "model": {"name": "tiny-limb",
                                                            "version": "0.0.1"},
         "reason": "body part examined is CHEST, the model reads HAND"}]


def test_anatomy_no_model_reads_gets_every_reason_and_unstated_anatomy_every_model(
        routed: Routed) -> None:
    by_series, document, _ = routed
    assert by_series["skull"] == ["tiny-cxr rejected", "tiny-limb rejected"]
    # Without Body Part Examined the image-based checks decide, so both models look.
    assert by_series["unstated"] == ["tiny-cxr ok", "tiny-limb ok"]
    impression = str(document["impression"])
    assert "SKULL" in impression and "body part examined is HAND" not in impression


def test_the_replay_table_says_which_models_were_left_out(routed: Routed) -> None:
    table = routed[2]
    assert ("Left to the model for the series' anatomy (routed_elsewhere in findings.json): "
            "tiny-cxr 0.0.1 on 1 series, tiny-limb 0.0.1 on 1 series.") in table
