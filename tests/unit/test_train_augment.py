"""Batch augmentation: geometry by hand, value ranges, determinism."""

from __future__ import annotations

import torch

from dicom_ai.train.augment import CXR, FUNDUS, AugmentConfig, affine_matrices, augment


def test_identity_config_leaves_image_unchanged() -> None:
    x = torch.rand(2, 1, 8, 8)
    out = augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_rotation_matrix_by_hand() -> None:
    # rotate_deg 90 with U(-90, 90) sampling: whatever θ is drawn, the 2×2 block is a rotation
    # (orthonormal rows, determinant +1) with no scale or translation.
    m = affine_matrices(4, AugmentConfig(rotate_deg=90.0), torch.Generator().manual_seed(1))
    block = m[:, :, :2]
    eye = torch.eye(2).expand(4, 2, 2)
    assert torch.allclose(block @ block.transpose(1, 2), eye, atol=1e-6)
    assert torch.allclose(torch.linalg.det(block), torch.ones(4), atol=1e-6)
    assert torch.all(m[:, :, 2] == 0)


def test_zoom_and_translation_by_hand() -> None:
    # scale fixed at 2 → output→input map shrinks by 1/2; translate 0.25 of the half-width is
    # sampled in ±0.5 grid units.
    m = affine_matrices(3, AugmentConfig(scale=(2.0, 2.0), translate=0.25),
                        torch.Generator().manual_seed(2))
    assert torch.allclose(m[:, :, :2], torch.tensor([[0.5, 0.0], [0.0, 0.5]]).expand(3, 2, 2))
    assert torch.all(m[:, :, 2].abs() <= 0.5)


def test_hflip_maps_columns() -> None:
    cfg = AugmentConfig(hflip=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(16, 1, 1, 1) / 16.0
    out = augment(x, cfg, gen)
    for img in out:
        assert torch.allclose(img, x[0], atol=1e-5) or torch.allclose(img, x[0].flip(-1),
                                                                      atol=1e-5)


def test_cxr_never_flips_and_fundus_keeps_range() -> None:
    assert not CXR.hflip and not CXR.vflip
    gen = torch.Generator().manual_seed(0)
    out = augment(torch.rand(8, 3, 16, 16), FUNDUS, gen)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_seeded_generator_is_deterministic() -> None:
    x = torch.rand(4, 1, 16, 16)
    a = augment(x, CXR, torch.Generator().manual_seed(7))
    b = augment(x, CXR, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
