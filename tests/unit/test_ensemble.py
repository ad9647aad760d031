"""Ensembles: the mean of the members' logits, named layers per member, bundles that load them,
and recipes that describe them."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from dicom_ai.inference.bundle import BundleError, load_bundle
from dicom_ai.inference.ensemble import LogitEnsemble, member_layer
from dicom_ai.train.recipes import FUNDUS_DR
from dicom_ai.train.run import build_network
from tests.bundles import CXR_BLOCK, TINY_RESNET, write_bundle


def _linear(weights: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
    return layer


def test_ensemble_outputs_the_mean_of_its_members_logits() -> None:
    net = LogitEnsemble([_linear([[1.0, 0.0], [0.0, 1.0]]), _linear([[3.0, 0.0], [0.0, -1.0]])])
    # Members give (2, 5) and (6, -5) for x = (2, 5): the mean is (4, 0).
    assert net(torch.tensor([[2.0, 5.0]])).tolist() == [[4.0, 0.0]]


class _TwoOutputs(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * x, -self.scale * x.sum(dim=1, keepdim=True)


def test_ensemble_averages_each_output_of_multi_output_members() -> None:
    out = LogitEnsemble([_TwoOutputs(1.0), _TwoOutputs(3.0)])(torch.tensor([[1.0, 2.0]]))
    # Scales 1 and 3 average to 2: (2, 4) and -(2 · 3) = -6.
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].tolist() == [[2.0, 4.0]] and out[1].tolist() == [[-6.0]]


def test_ensemble_needs_a_member() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        LogitEnsemble([])


def test_member_layer_names_the_layer_inside_the_ensemble() -> None:
    assert member_layer("layer4", 2) == "members.2.layer4"


def test_ensemble_bundle_loads_and_averages(tmp_path: Path) -> None:
    ensemble = {"_target_": "dicom_ai.inference.ensemble.LogitEnsemble",
                "members": [TINY_RESNET, TINY_RESNET]}
    block = {**CXR_BLOCK, "gradcam_layer": [member_layer("layer4", k) for k in range(2)]}
    bundle = load_bundle(write_bundle(tmp_path, network_def=ensemble, block=block),
                         device=torch.device("cpu"))
    net = bundle.network
    assert isinstance(net, LogitEnsemble) and len(net.members) == 2
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        mean = (net.members[0](x) + net.members[1](x)) / 2
        assert torch.allclose(net(x), mean)


def test_bundle_naming_a_layer_its_network_lacks_is_refused_at_load(tmp_path: Path) -> None:
    block = copy.deepcopy(CXR_BLOCK)
    block["gradcam_layer"] = ["layer4", "members.1.layer4"]
    with pytest.raises(BundleError, match=r"no layer members\.1\.layer4 \(named by"):
        load_bundle(write_bundle(tmp_path, block=block), device=torch.device("cpu"))


def test_ensemble_recipe_names_its_network_and_layers() -> None:
    recipe = dataclasses.replace(FUNDUS_DR, members=2)
    net = build_network(recipe.bundle_network_def)
    assert isinstance(net, LogitEnsemble) and len(net.members) == 2
    modules = dict(net.named_modules())
    assert recipe.bundle_gradcam_layers == ("members.0.layer4", "members.1.layer4")
    assert recipe.bundle_feature_layers == ("members.0.layer1", "members.0.layer2",
                                            "members.0.layer3", "members.0.layer4")
    assert set(recipe.bundle_gradcam_layers + recipe.bundle_feature_layers) <= set(modules)
    single = dataclasses.replace(FUNDUS_DR, members=1)
    assert single.bundle_network_def == FUNDUS_DR.network_def
    assert single.bundle_gradcam_layers == ("layer4",)
    with pytest.raises(ValueError, match="members must be at least 1"):
        dataclasses.replace(FUNDUS_DR, members=0)
