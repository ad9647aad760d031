"""Typed bundle specs: the shipped blocks parse, and a broken block is refused with every problem
listed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.inference.bundle import BundleError, _validate_block
from dicom_ai.inference.spec import SpecError, parse_classification

MODELS = Path(__file__).resolve().parents[2] / "models"
CLASSIFIERS = ("cxr-pneumonia", "fundus-dr", "derm-lesion")


def block(name: str) -> dict[str, Any]:
    meta = json.loads((MODELS / name / "configs" / "metadata.json").read_text())
    out: dict[str, Any] = meta["dicom_ai"]
    return out


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shipped_classification_blocks_parse(name: str) -> None:
    raw = block(name)
    spec = parse_classification(raw)
    assert spec.labels == tuple(raw["labels"])
    assert spec.size == tuple(raw["preprocessing"]["size"])
    assert set(spec.codes) == set(raw["labels"]) | {d["label"] for d in raw["derived_findings"]}
    assert spec.input_fit is not None and spec.input_fit.threshold > 0
    assert spec.accepts.modality == tuple(raw["accepts"]["modality"])


def test_derm_spec_by_value() -> None:
    spec = parse_classification(block("derm-lesion"))
    assert spec.input == "dermoscopy" and spec.aspect == "stretch"
    assert spec.decision.kind == "argmax"
    (malignant,) = spec.derived_findings
    assert malignant.label == "malignant" and malignant.sum_of == ("melanoma",)
    assert spec.codes["nevus"].value == "400096001"
    assert spec.accepts.require_anatomy is not None
    assert spec.accepts.require_anatomy.body_part_examined == ("SKIN",)


def test_every_problem_is_listed() -> None:
    raw = copy.deepcopy(block("derm-lesion"))
    raw["input"] = "mri"
    raw["preprocessing"]["size"] = [128]
    raw["decision"] = {"kind": "threshold", "label": "basal_cell_carcinoma"}
    del raw["codes"]["malignant"]
    raw["derived_findings"][0]["sum_of"] = ["melanoma", "lentigo"]
    raw["accepts"]["anatomic_region"] = ["CID999999"]
    raw["temperature"] = -1
    with pytest.raises(SpecError) as caught:
        parse_classification(raw)
    problems = caught.value.problems
    assert len(problems) == 8, problems
    text = "; ".join(problems)
    for part in ("input must be one of", "preprocessing.size", "'basal_cell_carcinoma' is not a",
                 "decision.threshold must be a number", "no finding code for label(s) malignant",
                 "unknown label(s) lentigo", "unknown context group", "temperature must be"):
        assert part in text, part


def test_gradcam_layer_is_one_name_or_a_list_of_names() -> None:
    raw = copy.deepcopy(block("cxr-pneumonia"))
    raw["gradcam_layer"] = "class_layers.relu"
    assert parse_classification(raw).gradcam_layers == ("class_layers.relu",)
    raw["gradcam_layer"] = ["members.0.layer4", "members.1.layer4"]
    assert parse_classification(raw).gradcam_layers == ("members.0.layer4", "members.1.layer4")
    del raw["gradcam_layer"]
    assert parse_classification(raw).gradcam_layers == ()
    raw["gradcam_layer"] = ["layer4", 4]
    with pytest.raises(SpecError, match="gradcam_layer must be a list of strings"):
        parse_classification(raw)


def test_bundle_load_refuses_with_the_list() -> None:
    raw = copy.deepcopy(block("fundus-dr"))
    del raw["accepts"]["modality"]
    raw["labels"] = ["only"]
    with pytest.raises(BundleError, match=r"^toy: dicom_ai: accepts\.modality is missing; .*"
                                          r"at least two distinct labels"):
        _validate_block("toy", raw)
    # Other tasks have their routing rules checked the same way.
    with pytest.raises(BundleError, match=r"accepts\.min_instances must be a positive integer"):
        _validate_block("ct", {"task": "ct-lung", "accepts": {"modality": ["CT"],
                                                             "min_instances": 0}})


def test_shipped_fracture_block_parses_and_loads_with_typed_rules() -> None:
    import torch

    from dicom_ai.inference.bundle import load_bundle
    from dicom_ai.inference.spec import FractureSpec

    raw = block("xr-fracture")
    bundle = load_bundle(MODELS / "xr-fracture", device=torch.device("cpu"))
    assert isinstance(bundle.spec, FractureSpec)
    assert bundle.accepts == bundle.spec.accepts
    assert bundle.spec.size == tuple(raw["preprocessing"]["size"])
    assert bundle.spec.stride == raw["preprocessing"]["stride"]
    assert bundle.spec.boxes.min_score == raw["boxes"]["min_score"]
    assert bundle.spec.codes["fracture"].value == raw["codes"]["fracture"]["value"]
    assert bundle.accepts.body_part_examined == tuple(raw["accepts"]["body_part_examined"])


def test_fracture_bundle_refused_with_every_problem() -> None:
    raw = copy.deepcopy(block("xr-fracture"))
    del raw["boxes"]["min_score"]
    raw["preprocessing"]["stride"] = "4"
    raw["decision"] = {"kind": "argmax"}
    raw["accepts"]["modality"] = "CR"
    with pytest.raises(BundleError) as caught:
        _validate_block("frac", raw)
    text = str(caught.value)
    for part in ("boxes.min_score must be a number", "preprocessing.stride",
                 "decision must be a threshold on 'fracture'",
                 "accepts.modality must be a list of strings"):
        assert part in text, part


def test_routing_takes_parsed_rules_and_refuses_invalid_raw_rules() -> None:
    from dicom_ai.inference.routing import as_accepts, not_applicable, unfit
    from tests.unit.test_routing import series as make_series

    accepts = parse_classification(block("cxr-pneumonia")).accepts
    series = make_series(BodyPartExamined="CHEST", ViewPosition="LL")
    assert not_applicable(accepts, series) is None
    assert unfit(accepts, series) == "view position LL is not a frontal (PA/AP) view"
    # The raw block gives the same answers, parsed on the way in.
    assert unfit(block("cxr-pneumonia")["accepts"], series) == unfit(accepts, series)
    assert as_accepts(accepts) is accepts
    with pytest.raises(SpecError, match=r"accepts\.modality is missing.*min_instances"):
        as_accepts({"min_instances": -1})
