"""Tiny, randomly initialised model bundles built inside tests.

They exercise the real loader, routing and runner without the shipped weights; nothing here is
shipped in ``models/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

TINY_RESNET = {
    "_target_": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [4, 8, 8, 8],
    "spatial_dims": 2,
    "n_input_channels": 1,
    "num_classes": 2,
}

CXR_BLOCK: dict[str, Any] = {
    "task": "classification",
    "input": "xray",
    "accepts": {"modality": ["CR", "DX"],
                "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
                "body_part_examined": ["CHEST"], "reject_view_position": ["LL", "RL"]},
    "preprocessing": {"size": [32, 32], "aspect": "pad"},
    "labels": ["normal", "pneumonia"],
    "temperature": 1.0,
    "decision": {"kind": "threshold", "label": "pneumonia", "threshold": 0.5},
    "derived_findings": [],
    "codes": {"normal": {"value": "17621005", "scheme": "SCT", "meaning": "Normal"},
              "pneumonia": {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}},
    "finding_site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung structure"},
    "gradcam_layer": "layer4",
}


def write_bundle(root: Path, *, name: str = "tiny-cxr", version: str = "0.0.1",
                 block: dict[str, Any] | None = None,
                 network_def: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a bundle with random weights (fixed seed) to ``root/name`` and return its path."""
    network_def = network_def or TINY_RESNET
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    metadata = {"name": name, "version": version, "monai_version": "1.6.1",
                "dicom_ai": block if block is not None else CXR_BLOCK}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    torch.manual_seed(seed)
    net = ConfigParser({"n": network_def}).get_parsed_content("n")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle
