"""A tiny FracAtlas-like set for the fracture training loop: eight 32² noise images, the odd
ones fractured with one 8-pixel box each."""

from __future__ import annotations

import numpy as np

from dicom_ai.train.fracture import FractureSet


def tiny_fracture_set() -> FractureSet:
    """Eight images, labels 0, 1, 0, 1, …; each fractured one has the box (8, 8)–(16, 16)."""
    rng = np.random.default_rng(0)
    images = rng.random((8, 1, 32, 32)).astype(np.float16)
    boxes = tuple(np.array([[8.0, 8.0, 16.0, 16.0]], np.float32) if i % 2 else
                  np.zeros((0, 4), np.float32) for i in range(8))
    return FractureSet(images, np.array([i % 2 for i in range(8)]), boxes, ("hand",) * 8,
                       tuple(f"{i}.jpg" for i in range(8)))
