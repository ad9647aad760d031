"""Pieces of the ct-lung training and validation: lesion masks from boxes, patches, synthetic
lesions and the FROC figures of the model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from dicom_ai.dicom.model import Instance
from dicom_ai.imaging.ct import CTVolume
from dicom_ai.train.ct_nodules import (
    Scored,
    box_lesion,
    crop,
    froc,
    insert_lesion,
    operating_threshold,
    read_voc_box,
    sensitivity_at,
)


def _volume(hu: npt.NDArray[np.float64]) -> CTVolume:
    instances = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.{k}"
        instances.append(Instance(Path(f"{k}.dcm"), ds))
    return CTVolume(hu.astype(np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3),
                    tuple(instances))


def test_read_voc_box(tmp_path: Path) -> None:
    path = tmp_path / "1.2.3.1.xml"
    path.write_text("<annotation><object><name>A</name><bndbox><xmin>146</xmin><ymin>285</ymin>"
                    "<xmax>207</xmax><ymax>335</ymax></bndbox></object></annotation>")
    assert read_voc_box(path) == (146, 285, 207, 335)
    (tmp_path / "empty.xml").write_text("<annotation/>")
    with pytest.raises(ValueError, match="bndbox"):
        read_voc_box(tmp_path / "empty.xml")


def test_box_lesion_is_the_tissue_of_the_inscribed_ellipse() -> None:
    hu = np.full((3, 20, 20), -850.0)
    hu[:, 5:15, 5:15] = 30.0
    hu[1, 9, 9] = -900.0  # an air bubble inside the tumour is not tumour
    lesions = box_lesion(_volume(hu), {"1.2.3.1": (4, 6, 14, 12), "1.2.3.2": (4, 6, 14, 12)})
    assert lesions.max() == 1  # boxes on adjacent slices make one lesion
    assert not lesions[0].any() and lesions[1, 9, 9] == 0
    # Ellipse centre (row 9, col 9), semi-axes 3.5 rows and 5.5 columns.
    assert lesions[2, 9, 9] == 1 and lesions[2, 6, 9] == 1 and lesions[2, 9, 15] == 0
    assert lesions[2, 5, 9] == 0  # outside the ellipse (row 5 is 4 rows from the centre)


def test_crop_clamps_slices_and_fills_outside() -> None:
    values = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    out = crop(values, (0, 0, 0), 3, 4, -1000.0)
    assert out.shape == (3, 4, 4)
    assert np.array_equal(out[0], out[1])  # slice −1 is slice 0 repeated
    assert out[1, 2, 2] == values[0, 0, 0] and out[1, 0, 0] == -1000.0
    assert out[2, 3, 3] == values[1, 1, 1]


def test_insert_lesion_labels_the_solid_part() -> None:
    rng = np.random.default_rng(3)
    hu = np.full((3, 64, 64), -850.0, dtype=np.float32)
    label = insert_lesion(hu, (2.5, 1.0, 1.0), (31.5, 31.5), rng)
    assert label[31, 31] and label.sum() >= np.pi * 2.0**2 * 0.5  # at least a 4 mm lesion
    assert hu[1][label].mean() > -400.0  # solid to part-solid inside
    assert np.allclose(hu[1, 0, 0], -850.0, atol=1.0)  # untouched far away


def test_froc_and_operating_point() -> None:
    scored = [
        Scored("a", 0.9, 1, False), Scored("a", 0.8, None, False), Scored("a", 0.7, 1, False),
        Scored("b", 0.6, None, True), Scored("b", 0.5, 1, False), Scored("b", 0.4, None, False),
    ]
    points = froc(scored, n_lesions=3, n_scans=2)  # lesion 2 of scan "a" is never found
    by_t = {round(p["threshold"], 1): p for p in points}
    assert by_t[0.9]["sensitivity"] == pytest.approx(1 / 3) and by_t[0.9]["fp_per_scan"] == 0
    assert by_t[0.8]["fp_per_scan"] == 0.5
    assert by_t[0.6]["fp_per_scan"] == 0.5  # the FP at a small-nodule mark is not counted
    assert by_t[0.5]["sensitivity"] == pytest.approx(2 / 3)
    assert by_t[0.4]["fp_per_scan"] == 1.0
    assert sensitivity_at(points, 0.0) == pytest.approx(1 / 3)
    assert sensitivity_at(points, 0.5) == pytest.approx(2 / 3)
    assert operating_threshold(points, 0.5, 0.3) == pytest.approx(0.5)
    assert operating_threshold(points, 1.0, 0.3) == pytest.approx(0.4)
    assert operating_threshold([], 1.0, 0.3) == 0.3
