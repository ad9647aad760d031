"""The shipped bundles: MONAI config round trip, weights, metadata contract, size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle.config_parser import ConfigParser

from dicom_ai import DISCLAIMER
from dicom_ai.inference.input_fit import FeatureTap, layer_names, load_statistics
from dicom_ai.train.package import decision_and_derived, metadata
from dicom_ai.train.recipes import RECIPES

MODELS = Path(__file__).resolve().parents[2] / "models"
MONAI_KEYS = {"schema", "version", "monai_version", "pytorch_version", "numpy_version",
              "required_packages_version", "task", "description", "authors", "copyright",
              "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
              "eval_metrics", "intended_use", "references", "network_data_format"}
LABELS = {"cxr-pneumonia": ["normal", "pneumonia"],
          "fundus-dr": ["dr_grade_0", "dr_grade_1", "dr_grade_2", "dr_grade_3", "dr_grade_4"],
          "derm-lesion": ["melanoma", "nevus", "seborrheic_keratosis"]}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_bundle_round_trip(name: str) -> None:
    root = MODELS / name
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    config = json.loads((root / "configs" / "inference.json").read_text())
    assert set(meta) >= MONAI_KEYS
    # The bundle is the one its recipe writes: same version and changelog.
    recipe = RECIPES[name]
    assert meta["version"] == recipe.version and meta["name"] == name
    assert meta["changelog"] == dict(recipe.changelog)
    block = meta["dicom_ai"]
    assert block["labels"] == LABELS[name]
    assert set(block["codes"]) >= set(LABELS[name])
    assert DISCLAIMER in meta["description"]
    net = ConfigParser(config).get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    modules = dict(net.named_modules())
    # One layer, or one per member of an ensemble.
    layers = block["gradcam_layer"]
    assert set([layers] if isinstance(layers, str) else layers) <= set(modules)
    size = block["preprocessing"]["size"]
    channels = meta["network_data_format"]["inputs"]["image"]["num_channels"]
    stats = load_statistics(root / block["input_fit"]["stats"])
    with torch.no_grad(), FeatureTap(net, layer_names(block["input_fit"])) as tap:
        logits = net(torch.full((2, channels, *size), 0.5))
    assert logits.shape == (2, len(LABELS[name])) and torch.isfinite(logits).all()
    assert tap.features.shape[1] == stats["mean"].shape[0]
    assert block["temperature"] > 0
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 50 * 2**20


def test_metadata_fills_decision_and_input_fit() -> None:
    recipe = RECIPES["cxr-pneumonia"]
    decision = {**recipe.dicom_ai["decision"], "threshold": 0.3}
    meta = metadata(recipe, temperature=1.2, decision=decision, derived=[], fit_threshold=40.0,
                    eval_metrics={"auc": 0.9})
    block = meta["dicom_ai"]
    assert block["decision"]["threshold"] == 0.3
    assert block["input_fit"] == {"kind": "mahalanobis", "layer": list(recipe.feature_layers),
                                  "stats": "models/input_fit.pt", "threshold": 40.0,
                                  "criterion": "99.5th percentile of validation scores"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "normal", "1": "pneumonia"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(recipe.size)


def test_decision_and_derived_thresholds_from_validation() -> None:
    labels = np.array([0, 1, 1, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])
    decision, derived = decision_and_derived(RECIPES["cxr-pneumonia"], labels, probs)
    # Positives' scores 0.9, 0.8, 0.6, 0.3: ⌈0.95 × 4⌉ = 4 → the lowest, 0.3; midway to the
    # next lower score 0.1 → 0.2.
    assert decision["threshold"] == pytest.approx(0.2) and derived == []
    grades = np.array([0, 0, 2, 3, 4, 1])
    p5 = np.array([[0.6, 0.2, 0.1, 0.05, 0.05], [0.5, 0.3, 0.1, 0.05, 0.05],
                   [0.1, 0.2, 0.4, 0.2, 0.1], [0.1, 0.1, 0.2, 0.5, 0.1],
                   [0.0, 0.1, 0.1, 0.2, 0.6], [0.2, 0.5, 0.2, 0.05, 0.05]])
    decision, derived = decision_and_derived(RECIPES["fundus-dr"], grades, p5)
    assert decision == {"kind": "argmax"}
    # P(grade ≥ 2) = 0.2, 0.2, 0.7, 0.8, 0.9, 0.3: every threshold in (0.3, 0.7] separates
    # perfectly; the highest such observed score is 0.7, midway to 0.3 → 0.5.
    assert derived[0]["label"] == "referable_dr"
    assert derived[0]["threshold"] == pytest.approx(0.5)


def test_derived_finding_at_a_minimum_sensitivity() -> None:
    # Melanoma (class 0) scores 0.9, 0.8, 0.5, 0.2 for the four melanomas: ⌈0.90 × 4⌉ = 4 →
    # the lowest, 0.2; midway to the next lower score of any image (0.1) → 0.15. Youden's J
    # would have put it at 0.5 and missed the fourth melanoma.
    labels = np.array([0, 0, 0, 0, 1, 2, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1],
                      [0.1, 0.8, 0.1], [0.05, 0.15, 0.8], [0.3, 0.6, 0.1]])
    decision, derived = decision_and_derived(RECIPES["derm-lesion"], labels, probs)
    assert decision == {"kind": "argmax"}
    assert derived[0]["label"] == "malignant" and derived[0]["sum_of"] == ["melanoma"]
    assert derived[0]["threshold"] == pytest.approx(0.15)


def test_cli_names_every_recipe_without_importing_torch() -> None:
    import subprocess
    import sys

    from dicom_ai.train.commands import CLASSIFIERS

    assert sorted(CLASSIFIERS) == sorted(RECIPES)
    code = ("import sys; from dicom_ai.cli import build_parser; build_parser(); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
