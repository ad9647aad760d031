"""Bundle loading: network from network_def, weights_only state dict, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dicom_ai.inference.bundle import BundleError, load_all, load_bundle, select_device
from tests.bundles import CXR_BLOCK, write_bundle

CPU = torch.device("cpu")


def test_loads_network_in_eval_mode(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path), device=CPU)
    assert bundle.name == "tiny-cxr" and bundle.version == "0.0.1"
    assert not bundle.network.training
    assert bundle.task == "classification"
    assert bundle.info.device_uid.startswith("2.25.")


def test_device_uid_changes_with_weights(tmp_path: Path) -> None:
    a = load_bundle(write_bundle(tmp_path / "a", seed=1), device=CPU)
    b = load_bundle(write_bundle(tmp_path / "b", seed=2), device=CPU)
    again = load_bundle(write_bundle(tmp_path / "c", seed=1), device=CPU)
    assert a.info.device_uid != b.info.device_uid
    assert a.info.device_uid == again.info.device_uid


def test_select_device() -> None:
    assert select_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(BundleError, match="no CUDA GPU"):
            select_device("cuda")


def test_missing_weights_and_bad_block(tmp_path: Path) -> None:
    path = write_bundle(tmp_path)
    (path / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"missing models/model\.pt"):
        load_bundle(path, device=CPU)
    bad = write_bundle(tmp_path / "x", block={**CXR_BLOCK, "task": "segmentation"})
    with pytest.raises(BundleError, match=r"dicom_ai\.task must be one of"):
        load_bundle(bad, device=CPU)
    nocode = write_bundle(tmp_path / "y", block={**CXR_BLOCK, "codes": {}})
    with pytest.raises(BundleError, match="no finding code for label"):
        load_bundle(nocode, device=CPU)


def test_weights_that_do_not_fit_the_network(tmp_path: Path) -> None:
    path = write_bundle(tmp_path)
    config = json.loads((path / "configs" / "inference.json").read_text())
    config["network_def"]["num_classes"] = 3
    (path / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="cannot build the network"):
        load_bundle(path, device=CPU)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = write_bundle(tmp_path)
    torch.save({"evil": object()}, path / "models" / "model.pt")
    with pytest.raises(BundleError):
        load_bundle(path, device=CPU)


def test_load_all_reports_broken_bundles(tmp_path: Path) -> None:
    write_bundle(tmp_path, name="good")
    broken = write_bundle(tmp_path, name="broken")
    (broken / "configs" / "metadata.json").write_text("{not json")
    bundles, problems = load_all(tmp_path, device=CPU)
    assert [b.name for b in bundles] == ["good"]
    assert len(problems) == 1 and "invalid JSON" in problems[0]
