"""Routing: which models apply (else skip), and which series are unfit (else reject)."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from dicom_ai.dicom.model import Instance, Series
from dicom_ai.inference.routing import listed, not_applicable, skip_reason, unfit

CXR_ACCEPTS = {
    "modality": ["CR", "DX"],
    "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
    "body_part_examined": ["CHEST"],
    "reject_view_position": ["LL", "RL", "LATERAL"],
    "reject_image_type": ["LOCALIZER"],
}


def series(n: int = 1, **attrs: object) -> Series:
    instances = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.SOPInstanceUID = f"1.2.3.{i}"
        ds.StudyInstanceUID = "1.2.3"
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.Rows = ds.Columns = 8
        ds.Modality = "CR"
        ds.PhotometricInterpretation = "MONOCHROME2"
        for key, value in attrs.items():
            setattr(ds, key, value)
        instances.append(Instance(Path(f"{i}.dcm"), ds))
    return Series("1.2.3.4", instances)


def test_applies_by_modality_and_photometric() -> None:
    assert not_applicable(CXR_ACCEPTS, series()) is None
    assert not_applicable(CXR_ACCEPTS, series(Modality="MR")) == "modality MR"
    assert not_applicable(CXR_ACCEPTS, series(PhotometricInterpretation="RGB")) == \
        "photometric interpretation RGB"


def test_instance_without_pixels_does_not_apply() -> None:
    s = series()
    del s.instances[0].header.Rows
    assert not_applicable(CXR_ACCEPTS, s) == "no image pixel data"


def test_sop_class_rule() -> None:
    accepts = {"modality": ["CR"], "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.1.1"]}
    assert not_applicable(accepts, series()) == "SOP class 1.2.840.10008.5.1.4.1.1.1"


def test_fit_rules() -> None:
    assert unfit(CXR_ACCEPTS, series(BodyPartExamined="CHEST", ViewPosition="PA")) is None
    # Body Part Examined is often absent: not a reason to reject.
    assert unfit(CXR_ACCEPTS, series()) is None
    assert unfit(CXR_ACCEPTS, series(BodyPartExamined="HAND")) == \
        "body part examined is HAND, the model reads CHEST"
    parts = ["HAND", "WRIST", "ELBOW", "SHOULDER", "HIP", "KNEE", "ANKLE", "FOOT"]
    assert unfit({**CXR_ACCEPTS, "body_part_examined": parts},
                 series(BodyPartExamined="CHEST")) == \
        "body part examined is CHEST, the model reads HAND, WRIST, ELBOW, SHOULDER, HIP and 3 more"
    assert unfit(CXR_ACCEPTS, series(ViewPosition="LL")) == \
        "view position LL is not a frontal (PA/AP) view"
    assert unfit(CXR_ACCEPTS, series(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])) == \
        "image type LOCALIZER is not analysed"


def test_slice_rules() -> None:
    accepts = {"modality": ["CR"], "min_instances": 3, "max_slice_thickness_mm": 5}
    assert unfit(accepts, series(2)) == "2 image(s), the model needs at least 3"
    assert unfit(accepts, series(3, SliceThickness=8)) == \
        "slice thickness 8 mm exceeds the model's limit of 5 mm"
    assert unfit(accepts, series(3, SliceThickness=1.25)) is None


def test_skip_reason() -> None:
    s = series(Modality="MR")
    assert skip_reason(s, ["modality MR", "modality MR"]) == "no model accepts modality MR"
    assert skip_reason(s, []) == "no model is installed"
    assert skip_reason(s, ["modality MR", "photometric interpretation RGB"]) == \
        "no model accepts this series: modality MR; photometric interpretation RGB"


def test_a_reason_lists_five_values_and_counts_the_rest() -> None:
    assert listed(["A"]) == "A"
    assert listed(["A", "B", "C", "D", "E"]) == "A, B, C, D, E"
    assert listed(["A", "B", "C", "D", "E", "F"]) == "A, B, C, D, E and 1 more"
