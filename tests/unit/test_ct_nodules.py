"""Pieces of the ct-lung training and validation: lesion masks from boxes, patches, synthetic
lesions and the FROC figures of the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from dicom_ai.dicom.model import Instance
from dicom_ai.imaging.ct import CTVolume
from dicom_ai.inference.ct_lung import Calibration
from dicom_ai.train.ct_nodules import (
    Scored,
    box_lesion,
    calibration_report,
    counted,
    crop,
    fit_platt,
    froc,
    insert_lesion,
    operating_threshold,
    out_of_patient,
    read_voc_box,
    sensitivity_at,
)

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "ct-lung"


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


def test_platt_fit_recovers_a_known_calibration() -> None:
    rng = np.random.default_rng(0)
    truth = Calibration(0.3, -2.0)
    raw = 1.0 / (1.0 + np.exp(-rng.uniform(-5.0, 15.0, size=4000)))
    hits = rng.random(4000) < truth(raw)
    fitted = fit_platt(raw, hits)
    assert fitted.a == pytest.approx(0.3, abs=0.05) and fitted.b == pytest.approx(-2.0, abs=0.3)
    with pytest.raises(ValueError, match="hits and false positives"):
        fit_platt([0.9, 0.8], [False, False])


def test_calibration_report_and_out_of_patient_fit() -> None:
    report = calibration_report([1.0, 1.0, 0.0, 0.0], [True, False, False, False])
    assert report["brier"] == pytest.approx(0.25) and report["hit_rate"] == 0.25
    assert report["mean_probability"] == 0.5 and report["share_at_least_0.99"] == 0.5
    assert report["ece"] == pytest.approx(0.25)  # 2 of 4 at p = 1.0 (half hit), 2 at 0 (none)
    scored = [Scored("a", 0.99, 1, False), Scored("a", 0.9, None, False),
              Scored("b", 0.95, 1, False), Scored("b", 0.6, None, False),
              Scored("c", 0.97, 1, False), Scored("c", 0.7, None, True),
              Scored("c", 0.8, None, False)]
    assert len(counted(scored)) == 6  # the candidate at a small-nodule mark is not counted
    held_out = out_of_patient(scored)
    assert len(held_out) == 6 and all(0.0 < p < 1.0 for p in held_out)


def test_shipped_calibration_is_the_validated_one_and_not_saturated() -> None:
    """The bundle's calibration is the one fitted on its validation candidates, and on those
    candidates (leave-one-patient-out, so none was seen by the network that scored it) the
    calibrated probabilities no longer crowd at 1.0 and fit the hit rate better than the raw
    peaks do."""
    validation = json.loads((BUNDLE / "docs" / "validation.json").read_text(encoding="utf-8"))
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text(encoding="utf-8"))
    block = metadata["dicom_ai"]
    cal = Calibration.from_block(block["calibration"])
    assert cal.a == pytest.approx(validation["calibration"]["a"], rel=1e-5)
    assert cal.b == pytest.approx(validation["calibration"]["b"], rel=1e-5)
    records = [c for f in validation["folds"] for c in f["candidates"]
               if c["lesion"] is not None or not c["ignored"]]
    raw = np.array([c["raw_probability"] for c in records])
    hits = np.array([c["lesion"] is not None for c in records])
    assert hits.any() and not hits.all()
    calibrated = cal(raw)
    np.testing.assert_allclose(calibrated, [c["probability"] for c in records], atol=1e-4)
    before, after = calibration_report(raw, hits), calibration_report(calibrated, hits)
    assert after["share_at_least_0.99"] == 0.0 < before["share_at_least_0.99"]
    assert after["brier"] < before["brier"] and after["ece"] < before["ece"]
    assert abs(after["mean_probability"] - after["hit_rate"]) < 0.05
    # The operating point is stated on the calibrated scale, where validation chose it.
    assert block["thresholds"]["positive"] == pytest.approx(
        validation["operating_threshold"], abs=1e-6)
    every = cal(np.array([c["raw_probability"] for f in validation["folds"]
                          for c in f["candidates"]]))
    assert np.min(np.abs(every - validation["operating_threshold"])) < 1e-6
