"""Turn trained weights into a MONAI bundle: calibration, operating point, input-fit statistics,
``configs/metadata.json`` and ``configs/inference.json``."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

import dicom_ai
from dicom_ai.inference.input_fit import FeatureTap, fit_statistics, mahalanobis
from dicom_ai.inference.runner import calibrated_softmax as softmax
from dicom_ai.train.calibrate import (
    fit_temperature,
    threshold_for_sensitivity,
    youden_threshold,
)
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.evaluate import build_report
from dicom_ai.train.loop import predict_logits
from dicom_ai.train.recipes import Recipe
from dicom_ai.train.run import build_network, load_splits

#: Pneumonia operating point: the highest threshold that keeps this sensitivity on validation.
PNEUMONIA_MIN_SENSITIVITY = 0.95
#: Input-fit threshold: this percentile of the validation images' Mahalanobis distances.
INPUT_FIT_PERCENTILE = 99.5

META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
               "0.8.1/meta_schema_20220324.json")

_DATA = {
    "xray": {
        "source": "Kermany D, Zhang K, Goldbaum M (2018). Labeled Optical Coherence Tomography "
                  "(OCT) and Chest X-Ray Images for Classification. Mendeley Data v2, "
                  "doi:10.17632/rscbjbr9sx.2 — official train split, 224 px release; "
                  "validation carved by patient. CC BY 4.0.",
        "type": "jpeg (pediatric chest radiographs, Guangzhou Women and Children's Medical "
                "Center)",
        "references": ["Kermany DS et al. Identifying Medical Diagnoses and Treatable Diseases "
                       "by Image-Based Deep Learning. Cell 172(5):1122-1131, 2018."],
    },
    "fundus": {
        "source": "RetinaMNIST (MedMNIST v2, from the DeepDRiD challenge), 28x28 RGB, official "
                  "train/val splits. CC BY 4.0.",
        "type": "numpy (colour fundus photographs)",
        "references": ["Yang J et al. MedMNIST v2. Scientific Data 10:41, 2023.",
                       "Liu R et al. DeepDRiD: Diabetic Retinopathy - Grading and Image "
                       "Quality Estimation Challenge. Patterns 3(6):100512, 2022."],
    },
    "dermoscopy": {
        "source": "ISIC 2017 Challenge Part 3 (lesion classification), official training and "
                  "validation splits, 256x256 copies (aspect ratio not kept). CC-0.",
        "type": "jpeg (dermoscopic images)",
        "licence": "CC-0",
        "references": ["Codella NCF et al. Skin Lesion Analysis Toward Melanoma Detection: A "
                       "Challenge at the 2017 International Symposium on Biomedical Imaging "
                       "(ISBI), Hosted by the International Skin Imaging Collaboration (ISIC). "
                       "ISBI 2018; arXiv:1710.05006."],
    },
}


#: The modality of each input kind, for ``network_data_format``.
_MODALITY = {"xray": "CR/DX", "fundus": "OP", "dermoscopy": "XC"}


@dataclass(frozen=True)
class Predictions:
    """Validation logits and pooled features, and the training images' pooled features."""

    val_logits: npt.NDArray[np.float64]
    val_features: npt.NDArray[np.float64]
    train_features: npt.NDArray[np.float64]


def load_network(recipe: Recipe, bundle_dir: Path) -> nn.Module:
    """The recipe's network with the bundle's weights, in eval mode."""
    net = build_network(recipe.bundle_network_def)
    net.load_state_dict(torch.load(bundle_dir / "models" / "model.pt", map_location="cpu",
                                   weights_only=True))
    return net.eval()


def logits_and_features(net: nn.Module, layers: Sequence[str],
                        images: npt.NDArray[np.float16]) -> tuple[npt.NDArray[np.float64],
                                                                 npt.NDArray[np.float64]]:
    """Logits and pooled features of ``layers`` (side by side) for un-augmented images."""
    with FeatureTap(net, layers) as tap:
        logits = predict_logits(net, images)
    return logits, tap.features.double().numpy()


def predictions(recipe: Recipe, net: nn.Module, train: ImageSet,
                val: ImageSet) -> Predictions:
    """Everything calibration and the input-fit check need from the trained network."""
    val_logits, val_features = logits_and_features(net, recipe.bundle_feature_layers,
                                                   val.images)
    _, train_features = logits_and_features(net, recipe.bundle_feature_layers, train.images)
    return Predictions(val_logits, val_features, train_features)


def decision_and_derived(recipe: Recipe, labels: npt.NDArray[np.int64],
                         probs: npt.NDArray[np.float64]) -> tuple[dict[str, Any],
                                                                  list[dict[str, Any]]]:
    """Fill the thresholds of the recipe's decision and derived findings from validation."""
    names = list(recipe.labels)
    decision = dict(recipe.dicom_ai["decision"])
    if decision["kind"] == "threshold":
        pos = names.index(decision["label"])
        decision["threshold"] = threshold_for_sensitivity(
            (labels == pos).astype(np.int64), probs[:, pos], PNEUMONIA_MIN_SENSITIVITY)
    derived = []
    for item in recipe.dicom_ai["derived_findings"]:
        members = [names.index(n) for n in item["sum_of"]]
        y = np.isin(labels, members).astype(np.int64)
        score = probs[:, members].sum(axis=1)
        # A derived finding names its own minimum sensitivity (melanoma → malignant), else
        # its threshold balances sensitivity and specificity.
        threshold = (threshold_for_sensitivity(y, score, float(item["min_sensitivity"]))
                     if "min_sensitivity" in item else youden_threshold(y, score))
        derived.append({**item, "threshold": threshold})
    return decision, derived


def network_data_format(recipe: Recipe) -> dict[str, Any]:
    """MONAI's ``network_data_format``: one image in, class logits out."""
    channels = recipe.network_def.get("in_channels", recipe.network_def.get("n_input_channels"))
    channel_def = {"0": "image"} if channels == 1 else {"0": "R", "1": "G", "2": "B"}
    return {
        "inputs": {"image": {
            "type": "image", "format": "magnitude" if channels == 1 else "RGB",
            "modality": _MODALITY[recipe.dicom_ai["input"]],
            "num_channels": channels, "spatial_shape": list(recipe.size), "dtype": "float32",
            "value_range": [0, 1], "is_patch_data": False, "channel_def": channel_def}},
        "outputs": {"pred": {
            "type": "logits", "format": "classes", "num_channels": len(recipe.labels),
            "spatial_shape": [len(recipe.labels)], "dtype": "float32",
            "value_range": [], "is_patch_data": False,
            "channel_def": {str(i): n for i, n in enumerate(recipe.labels)}}},
    }


def metadata(recipe: Recipe, *, temperature: float, decision: dict[str, Any],
             derived: list[dict[str, Any]], fit_threshold: float,
             eval_metrics: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI bundle metadata plus the ``dicom_ai`` block."""
    data = _DATA[recipe.dicom_ai["input"]]
    block = {
        **recipe.dicom_ai,
        "labels": list(recipe.labels),
        "temperature": round(temperature, 6),
        "decision": decision,
        "derived_findings": derived,
        "gradcam_layer": list(recipe.bundle_gradcam_layers),
        "input_fit": {"kind": "mahalanobis", "layer": list(recipe.bundle_feature_layers),
                      "stats": "models/input_fit.pt", "threshold": round(fit_threshold, 4),
                      "criterion": f"{INPUT_FIT_PERCENTILE:g}th percentile of validation "
                                   "scores"},
    }
    return {
        "schema": META_SCHEMA,
        "name": recipe.name,
        "version": recipe.version,
        "changelog": dict(recipe.changelog),
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"dicom-ai": dicom_ai.__version__},
        "task": recipe.description,
        "description": f"{recipe.description}. {dicom_ai.DISCLAIMER}. Research use only.",
        "authors": "dicom-ai contributors",
        "copyright": f"Copyright (c) dicom-ai contributors; weights trained on "
                     f"{data.get('licence', 'CC BY 4.0')} data",
        "data_source": data["source"],
        "data_type": data["type"],
        "image_classes": network_data_format(recipe)["inputs"]["image"]["format"],
        "label_classes": ", ".join(recipe.labels),
        "pred_classes": ", ".join(recipe.labels),
        "eval_metrics": eval_metrics,
        "intended_use": f"Research and engineering tests of PACS integration only. "
                        f"{dicom_ai.DISCLAIMER}; not for clinical use.",
        "references": data["references"],
        "network_data_format": network_data_format(recipe),
        "dicom_ai": block,
    }


def export_bundle(recipe: Recipe, bundle_dir: Path, *, data_dir: Path, cache_dir: Path,
                  threads: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Calibrate the trained weights in ``bundle_dir/models/model.pt`` on validation, fit the
    input-fit statistics on training features, and write the bundle's configs.

    Returns
    -------
    dict
        The metadata written to ``configs/metadata.json``.
    """
    torch.set_num_threads(threads)
    train, val = load_splits(recipe, data_dir, cache_dir)
    net = load_network(recipe, bundle_dir)
    pred = predictions(recipe, net, train, val)
    temperature = fit_temperature(pred.val_logits, val.labels)
    probs = softmax(pred.val_logits, temperature)
    decision, derived = decision_and_derived(recipe, val.labels, probs)
    stats = fit_statistics(pred.train_features)
    fit_threshold = float(np.percentile(mahalanobis(pred.val_features, stats),
                                        INPUT_FIT_PERCENTILE))
    meta = metadata(recipe, temperature=temperature, decision=decision, derived=derived,
                    fit_threshold=fit_threshold, eval_metrics={})
    meta["eval_metrics"] = build_report(meta, val.labels, pred.val_logits).metrics()
    (bundle_dir / "configs").mkdir(parents=True, exist_ok=True)
    torch.save(stats, bundle_dir / "models" / "input_fit.pt")
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    inference = {"imports": recipe.bundle_imports("$import monai"),
                 "network_def": recipe.bundle_network_def}
    (bundle_dir / "configs" / "inference.json").write_text(json.dumps(inference, indent=2)
                                                          + "\n")
    log(f"{recipe.name}: temperature {temperature:.3f}, decision {decision}, derived "
        f"{derived}, input-fit threshold {fit_threshold:.2f} on {platform.machine()}")
    return meta
