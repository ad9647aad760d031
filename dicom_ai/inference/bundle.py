"""MONAI bundles as dicom-ai models: discovery, validation, loading (once), device choice.

A bundle is a directory ``<models_dir>/<name>/`` laid out as ``docs/bundle-format.md`` says.
The network is built from ``configs/inference.json`` (``network_def``) with MONAI's
``ConfigParser`` and its state dict loaded with ``weights_only=True``: a bundle never runs
arbitrary pickled code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydicom.uid import generate_uid

from dicom_ai.inference.findings import ModelInfo
from dicom_ai.inference.spec import (
    Accepts,
    ClassificationSpec,
    FractureSpec,
    SpecError,
    parse_accepts,
    parse_classification,
    parse_fracture,
)

log = logging.getLogger(__name__)

#: Tasks the pipeline knows how to run; a bundle declaring anything else is refused at load.
TASKS = ("classification", "ct-lung", "detection", "xr-fracture")


class BundleError(ValueError):
    """A model bundle is missing a file, declares something invalid or cannot be loaded."""


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` → CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise BundleError("inference.device is 'cuda' but torch sees no CUDA GPU")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Bundle:
    """A loaded model: metadata, the network in eval mode on its device, and its identity."""

    root: Path
    metadata: dict[str, Any]
    dicom_ai: dict[str, Any]
    network: torch.nn.Module
    device: torch.device
    info: ModelInfo
    inference_config: dict[str, Any]
    #: The routing rules (``dicom_ai.accepts``), parsed once when the bundle loads; the pipeline
    #: checks every series against these.
    accepts: Accepts
    #: The parsed ``dicom_ai`` block of a classification or fracture bundle.
    spec: ClassificationSpec | FractureSpec | None = None
    #: MONAI Grad-CAM explainers by layer, made on first use by
    #: :func:`dicom_ai.inference.runner.gradcam` and kept: each registers hooks on the network
    #: that are never removed, so one made per image would add hooks to every later pass.
    gradcams: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def task(self) -> str:
        return str(self.dicom_ai["task"])

    def file(self, relative: str) -> Path:
        """A file inside the bundle; refuses paths that escape it."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise BundleError(f"{self.root.name}: {relative!r} points outside the bundle")
        return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise BundleError(f"{path.parent.parent.name}: missing {path.parent.name}/{path.name}") \
            from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _detection_defaults() -> dict[str, Any]:
    """A MONAI Model Zoo detection bundle has no ``dicom_ai`` block: route it to chest CT."""
    return {
        "task": "detection",
        "input": "ct",
        "accepts": {"modality": ["CT"], "reject_image_type": ["LOCALIZER"], "min_instances": 16},
        "labels": ["nodule"],
    }


def _validate_block(name: str, block: dict[str, Any]
                    ) -> tuple[Accepts, ClassificationSpec | FractureSpec | None]:
    """Refuse a block that does not say what its task needs (every problem listed); the
    routing rules come back parsed, and a classification or fracture block as its spec
    (:mod:`dicom_ai.inference.spec`)."""
    task = block.get("task")
    if task not in TASKS:
        raise BundleError(f"{name}: dicom_ai.task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        if task == "classification":
            spec: ClassificationSpec | FractureSpec = parse_classification(block)
            return spec.accepts, spec
        if task == "xr-fracture":
            spec = parse_fracture(block)
            return spec.accepts, spec
    except SpecError as exc:
        raise BundleError(f"{name}: dicom_ai: {exc}") from exc
    problems: list[str] = []
    accepts = parse_accepts(block, problems)
    if problems:
        raise BundleError(f"{name}: dicom_ai: {'; '.join(problems)}")
    if task == "ct-lung":
        from dicom_ai.inference.ct_lung import validate_block as validate_ct_lung

        validate_ct_lung(name, block)
    return accepts, None


def device_uid(name: str, version: str, weights_sha256: str) -> str:
    """Device UID of the algorithm: changes whenever the weights change (retraining)."""
    return str(generate_uid(prefix="2.25.", entropy_srcs=[name, version, weights_sha256]))


def load_bundle(root: Path, *, device: torch.device) -> Bundle:
    """Load one bundle; raises :class:`BundleError` with a specific reason when it cannot."""
    root = Path(root)
    metadata = _read_json(root / "configs" / "metadata.json")
    config = _read_json(root / "configs" / "inference.json")
    name = str(metadata.get("name") or root.name)
    version = str(metadata.get("version", ""))
    if not version:
        raise BundleError(f"{name}: metadata.json has no version")
    block = metadata.get("dicom_ai")
    if block is None and "detector" in config:
        block = _detection_defaults()
    if not isinstance(block, dict):
        raise BundleError(f"{name}: metadata.json has no 'dicom_ai' block and is not a MONAI "
                          f"detection bundle")
    accepts, spec = _validate_block(name, block)
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise BundleError(f"{name}: missing models/model.pt")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if "network_def" not in config:
        raise BundleError(f"{name}: configs/inference.json has no network_def")
    import pickle

    from monai.bundle.config_parser import ConfigParser

    try:
        # The whole config is parsed (lazily) so that references such as MONAI Model Zoo
        # detection bundles' "@feature_extractor" inside network_def resolve.
        network = ConfigParser(config).get_parsed_content("network_def")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        network.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, ImportError,
            pickle.UnpicklingError) as exc:
        raise BundleError(f"{name}: cannot build the network from its weights: "
                          f"{str(exc).splitlines()[0]}") from exc
    modules = dict(network.named_modules())
    if missing := [layer for layer in _named_layers(spec) if layer not in modules]:
        raise BundleError(f"{name}: the network has no layer {', '.join(missing)} (named by "
                          f"gradcam_layer or input_fit)")
    network.to(device).eval()
    info = ModelInfo(name=name, version=version, device_uid=device_uid(name, version, digest),
                     manufacturer=str(metadata.get("authors", "dicom-ai")))
    return Bundle(root=root, metadata=metadata, dicom_ai=block, network=network, device=device,
                  info=info, inference_config=config, accepts=accepts, spec=spec)


def _named_layers(spec: ClassificationSpec | FractureSpec | None) -> list[str]:
    """The layers a spec hooks (Grad-CAM, the input-fit features)."""
    named = list(spec.gradcam_layers) if isinstance(spec, ClassificationSpec) else []
    if spec is not None and spec.input_fit is not None:
        named.extend(spec.input_fit.layers)
    return named


def discover(models_dir: Path) -> list[Path]:
    """Bundle directories (with ``configs/metadata.json``) under ``models_dir``, sorted."""
    return sorted(p.parent.parent for p in Path(models_dir).glob("*/configs/metadata.json"))


def load_all(models_dir: Path, *, device: torch.device) -> tuple[list[Bundle], list[str]]:
    """Load every bundle under ``models_dir``; a broken bundle is reported, not fatal."""
    bundles: list[Bundle] = []
    problems: list[str] = []
    for root in discover(models_dir):
        try:
            bundles.append(load_bundle(root, device=device))
        except BundleError as exc:
            log.error("model bundle not loaded: %s", exc)
            problems.append(str(exc))
    return bundles, problems
