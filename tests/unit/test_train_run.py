"""Warm starts: a recipe that begins from earlier weights accepts only those weights; a bundle
is evaluated at the input size it says."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from dicom_ai.train.recipes import DERM_LESION, Recipe, WarmStart
from dicom_ai.train.run import build_network, bundle_recipe, warm_start_weights


def _recipe_for(path: Path) -> Recipe:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return dataclasses.replace(DERM_LESION, warm_start=WarmStart(digest, "HEAD", "init.pt"))


def test_warm_start_loads_the_named_weights(tmp_path: Path) -> None:
    net = build_network(DERM_LESION.network_def)
    path = tmp_path / "init.pt"
    torch.save(net.state_dict(), path)
    recipe = _recipe_for(path)
    state = warm_start_weights(recipe, path)
    fresh = build_network(DERM_LESION.network_def)
    fresh.load_state_dict(state)
    for name, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)


def test_warm_start_refuses_other_weights_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "init.pt"
    torch.save({"w": torch.zeros(1)}, path)
    recipe = _recipe_for(path)
    other = tmp_path / "other.pt"
    torch.save({"w": torch.ones(1)}, other)
    with pytest.raises(ValueError, match="sha256"):
        warm_start_weights(recipe, other)
    with pytest.raises(ValueError, match="--init"):
        warm_start_weights(recipe, None)
    with pytest.raises(ValueError, match="no warm start"):
        warm_start_weights(dataclasses.replace(DERM_LESION, warm_start=None), path)


def test_shipped_derm_recipe_continues_the_1_2_0_weights() -> None:
    assert DERM_LESION.warm_start is not None
    assert DERM_LESION.warm_start.source == \
        "git show b29eeca:models/derm-lesion/models/model.pt"
    assert len(DERM_LESION.warm_start.sha256) == 64


@pytest.mark.parametrize("name", ["derm-lesion"])
def test_warm_start_weights_are_in_the_repository_history(name: str) -> None:
    """The weights a recipe starts from are the ones git keeps where it says."""
    import shutil
    import subprocess

    from dicom_ai.train.recipes import RECIPES, XR_FRACTURE

    recipe = XR_FRACTURE if name == "xr-fracture" else RECIPES[name]
    assert recipe.warm_start is not None
    repo = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("no git checkout")
    blob = subprocess.run(["git", "show", f"{recipe.warm_start.revision}:"
                                          f"{recipe.warm_start.path}"],
                          cwd=repo, capture_output=True, check=True, timeout=60).stdout
    assert hashlib.sha256(blob).hexdigest() == recipe.warm_start.sha256


def test_a_bundle_is_evaluated_at_its_own_input_size() -> None:
    """The shipped bundle says its size; a recipe trained at another keeps everything else."""
    import json

    repo = Path(__file__).resolve().parents[2]
    meta = json.loads((repo / "models" / "derm-lesion" / "configs" / "metadata.json").read_text())
    size = tuple(meta["dicom_ai"]["preprocessing"]["size"])
    other = (size[0] + 32, size[1] + 32)
    meta["dicom_ai"]["preprocessing"]["size"] = list(other)
    recipe = bundle_recipe(meta)
    assert recipe.size == other
    assert dataclasses.replace(recipe, size=DERM_LESION.size) == DERM_LESION
    with pytest.raises(KeyError):
        bundle_recipe({**meta, "name": "no-such-model"})
