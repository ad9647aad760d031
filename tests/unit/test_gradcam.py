"""Grad-CAM on a network small enough to work out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicom_ai.inference.bundle import Bundle
from dicom_ai.inference.ensemble import LogitEnsemble, member_layer
from dicom_ai.inference.findings import ModelInfo
from dicom_ai.inference.runner import gradcam, unit_scaled
from dicom_ai.inference.spec import Accepts


def _bundle() -> Bundle:
    # logit 0 = +mean(x), logit 1 = −mean(x): a bright pixel is evidence for class 0 only.
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 1, 1, bias=False))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(1, 2))
    with torch.no_grad():
        net.conv.weight.fill_(1.0)
        net.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net.fc.bias.zero_()
    return _bundle_of(net.eval())


def _bundle_of(net: nn.Module) -> Bundle:
    return Bundle(root=Path("."), metadata={}, dicom_ai={}, network=net,
                  device=torch.device("cpu"), info=ModelInfo("m", "0", "2.25.1"),
                  inference_config={}, accepts=Accepts(modality=("OT",)))


def _image() -> np.ndarray:
    image = np.zeros((1, 4, 4), dtype=np.float32)
    image[0, :2, :2] = 1.0
    image[0, 2:, 2:] = 0.5
    return image


def test_gradcam_is_hottest_where_the_evidence_for_the_class_is() -> None:
    # d logit0 / d conv output = 1/16 at every cell, so the channel weight is 1/16 and the map
    # ReLU(A / 16) is 1/16 top left, 1/32 bottom right, 0 elsewhere; scaled: 1, 0.5, 0.
    # (MONAI's default post-processing would give 0, 0.5 and 1.)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[:2, :2] = 1.0
    expected[2:, 2:] = 0.5
    assert gradcam(_bundle(), _image(), 0, ["conv"]) == pytest.approx(expected)


def test_gradcam_hooks_the_network_once_however_many_images_it_explains() -> None:
    # MONAI never removes the hooks an explainer registers: one explainer per image would
    # leave a hook per explained image on every later forward pass of the served network.
    bundle = _bundle()
    net = bundle.network
    assert isinstance(net, nn.Sequential)
    maps = [gradcam(bundle, _image(), k % 2, ["conv"]) for k in range(5)]
    assert len(net.conv._forward_hooks) == 1 and len(net.conv._backward_hooks) == 1
    assert maps[4] == pytest.approx(maps[0]) and not maps[3].any()


def test_gradcam_of_a_class_without_evidence_is_empty() -> None:
    # Class 1's channel weight is −1/16: every cell of ReLU(−A / 16) is 0.
    assert not gradcam(_bundle(), _image(), 1, ["conv"]).any()


def test_unit_scaled_maps_minimum_to_0_and_maximum_to_1() -> None:
    assert unit_scaled(np.array([2.0, 4.0, 3.0])) == pytest.approx([0.0, 1.0, 0.5])
    assert not unit_scaled(np.full((2, 2), 7.0)).any()


def _toy() -> nn.Module:
    net = _bundle().network
    assert isinstance(net, nn.Sequential)
    return net


def _ensemble_bundle(*members: nn.Module) -> Bundle:
    return _bundle_of(LogitEnsemble(members))


def test_ensemble_gradcam_sums_the_members_maps() -> None:
    layers = [member_layer("conv", k) for k in range(2)]
    single = gradcam(_bundle(), _image(), 0, ["conv"])
    # A member repeated: each map is half the single network's (the mean halves the
    # gradients), their sum the whole; scaled, the single network's map.
    assert gradcam(_ensemble_bundle(_toy(), _toy()), _image(), 0, layers) == \
        pytest.approx(single)
    # A member with no evidence for class 0 (its logit 0 is −mean) adds a zero map.
    against = _toy()
    with torch.no_grad():
        against.fc.weight.neg_()
    assert gradcam(_ensemble_bundle(_toy(), against), _image(), 0, layers) == \
        pytest.approx(single)


def test_gradcam_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        gradcam(_bundle(), _image(), 0, [])
