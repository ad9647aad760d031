"""SimCLR pretraining of the fracture encoder: the loss against values worked out by hand, the
reduced views (:func:`~dicom_ai.train.augment.augment` at a size), a resumed run equal to an
uninterrupted one (and a resume with other settings refused), and the warm start that copies
only the encoder."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_ai.train.augment import AugmentConfig, augment
from dicom_ai.train.contrastive import (
    ContrastiveConfig,
    encoder_state,
    nt_xent,
    pretrain,
)
from dicom_ai.train.loop import CheckpointMismatch
from dicom_ai.train.recipes import XR_FRACTURE
from dicom_ai.train.run import build_network, load_warm_start

#: A small network and problem: 8 images of 64 px, batches of 4, views of 64 px.
SMALL = {**XR_FRACTURE.network_def, "widths": [4, 4, 8, 8, 8], "fpn_channels": 4}
CFG = ContrastiveConfig(epochs=2, batch_size=4, view_side=64)


def test_nt_xent_by_hand() -> None:
    # Two images, their views identical: each row's positive has cosine 1, the two negatives 0,
    # so every row's loss is -log(e^(1/t) / (e^(1/t) + 2)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(nt_xent(z, 1.0)) == pytest.approx(math.log(2 + math.e) - 1, abs=1e-6)
    assert float(nt_xent(z, 0.5)) == pytest.approx(math.log(2 + math.e ** 2) - 2, abs=1e-6)
    # Swapping the views of one image makes its positive the orthogonal row: loss rises.
    swapped = z[[0, 1, 3, 2]]
    assert float(nt_xent(swapped, 1.0)) > float(nt_xent(z, 1.0))


def test_views_sample_at_the_view_side_and_keep_a_constant_image() -> None:
    x = torch.full((3, 1, 64, 64), 0.25)
    out = augment(x, AugmentConfig(), torch.Generator().manual_seed(0), size=(16, 16))
    assert out.shape == (3, 1, 16, 16)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)


def _images() -> np.ndarray:
    return np.random.default_rng(0).random((8, 1, 64, 64)).astype(np.float16)


def test_a_resumed_pretraining_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = pretrain(SMALL, _images(), CFG, checkpoint=tmp_path / "a.pt", log=lambda _: None)
    def cut_off(line: str) -> None:
        raise KeyboardInterrupt(line)

    with pytest.raises(KeyboardInterrupt, match="epoch 1/2"):
        pretrain(SMALL, _images(), CFG, checkpoint=tmp_path / "b.pt", log=cut_off)
    lines: list[str] = []
    resumed = pretrain(SMALL, _images(), CFG, checkpoint=tmp_path / "b.pt", resume=True,
                       log=lines.append)
    assert lines[0] == "resumed after epoch 1"
    assert straight.keys() == resumed.keys()
    assert all(k.startswith(("stem.", "stages.")) for k in straight)
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    assert any(not torch.equal(v, encoder_state(build_network(SMALL))[k])
               for k, v in straight.items() if v.is_floating_point())
    # Resuming with another configuration or other images would mix two runs: refused.
    with pytest.raises(CheckpointMismatch, match="other settings"):
        pretrain(SMALL, _images(), dataclasses.replace(CFG, temperature=0.5),
                 checkpoint=tmp_path / "b.pt", resume=True, log=lines.append)
    with pytest.raises(CheckpointMismatch, match="other settings"):
        pretrain(SMALL, _images()[:6], CFG, checkpoint=tmp_path / "b.pt", resume=True,
                 log=lines.append)


def test_pretraining_refuses_too_few_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one batch"):
        pretrain(SMALL, _images()[:3], CFG, checkpoint=tmp_path / "c.pt")


def test_a_warm_start_of_the_encoder_keeps_the_heads_of_the_seed() -> None:
    torch.manual_seed(1)
    source = build_network(SMALL)
    torch.manual_seed(2)
    net = build_network(SMALL)
    heads = {k: v.clone() for k, v in net.state_dict().items()
             if not k.startswith(("stem.", "stages."))}
    load_warm_start(net, ("stem", "stages"), encoder_state(source))
    state = net.state_dict()
    for k, v in encoder_state(source).items():
        assert torch.equal(state[k], v)
    for k, v in heads.items():
        assert torch.equal(state[k], v)


def test_a_warm_start_refuses_a_partial_or_foreign_encoder() -> None:
    net = build_network(SMALL)
    encoder = encoder_state(build_network(SMALL))
    partial = {k: v for k, v in encoder.items() if not k.startswith("stem.")}
    with pytest.raises(ValueError, match="missing"):
        load_warm_start(net, ("stem", "stages"), partial)
    with pytest.raises(ValueError, match="not of those modules"):
        load_warm_start(net, ("stem", "stages"), net.state_dict())
