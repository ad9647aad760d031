"""Anatomy rules of routing: dermoscopy and VL photographs of the skin go to the dermoscopy
model, fundus photographs to the fundus model, and neither claims the other's images."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_ai.dicom.model import Instance, Series
from dicom_ai.inference.routing import not_applicable, region_codes, unfit
from dicom_ai.train.recipes import RECIPES

DERMOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
DERM = RECIPES["derm-lesion"].dicom_ai["accepts"]
FUNDUS = RECIPES["fundus-dr"].dicom_ai["accepts"]


def region(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def photo(sop_class: str, modality: str, *, body_part: str = "",
          regions: tuple[Dataset, ...] = ()) -> Series:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.3.1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = modality
    ds.Rows = ds.Columns = 16
    ds.PhotometricInterpretation = "YBR_FULL_422"
    if body_part:
        ds.BodyPartExamined = body_part
    if regions:
        ds.AnatomicRegionSequence = Sequence(list(regions))
    return Series("1.2.3.4", [Instance(Path("1.dcm"), ds)])


SKIN_OF_BACK = region("66643007", "Skin of back")
RETINA = region("5665001", "Retina")


def verdict(accepts: dict[str, object], series: Series) -> str:
    """'skip', 'reject' or 'read'."""
    if not_applicable(accepts, series) is not None:
        return "skip"
    return "reject" if unfit(accepts, series) is not None else "read"


@pytest.mark.parametrize(("series", "derm", "fundus"), [
    # Dermoscopic Photography is skin by definition, with or without anatomy.
    (photo(DERMOSCOPIC, "DMS"), "read", "skip"),
    (photo(DERMOSCOPIC, "DMS", regions=(SKIN_OF_BACK,)), "read", "skip"),
    # VL Photographic of the skin: by body part or by a CID 4029 anatomic region.
    (photo(VL_PHOTOGRAPHIC, "XC", body_part="SKIN"), "read", "reject"),
    (photo(VL_PHOTOGRAPHIC, "XC", regions=(SKIN_OF_BACK,)), "read", "reject"),
    # A VL photograph that says nothing of what it shows is not assumed to be skin.
    (photo(VL_PHOTOGRAPHIC, "XC"), "reject", "read"),
    # A VL fundus photograph (CID 4209 region or body part EYE) is not for the skin model.
    (photo(VL_PHOTOGRAPHIC, "XC", regions=(RETINA,)), "reject", "read"),
    (photo(VL_PHOTOGRAPHIC, "XC", body_part="EYE"), "reject", "read"),
    # A radiograph exported as VL with its body part: neither model reads it.
    (photo(VL_PHOTOGRAPHIC, "XC", body_part="HAND"), "reject", "reject"),
    (photo(OP_8BIT, "OP", regions=(RETINA,)), "skip", "read"),
])
def test_dermoscopy_and_fundus_do_not_claim_each_other(series: Series, derm: str,
                                                       fundus: str) -> None:
    assert verdict(DERM, series) == derm
    assert verdict(FUNDUS, series) == fundus


def test_reasons_name_the_anatomy() -> None:
    reason = unfit(DERM, photo(VL_PHOTOGRAPHIC, "XC", regions=(RETINA,)))
    assert reason == "anatomic region Retina (SCT 5665001) is not one the model reads"
    reason = unfit(DERM, photo(VL_PHOTOGRAPHIC, "XC"))
    assert reason is not None and "Body Part Examined (SKIN)" in reason
    reason = unfit(FUNDUS, photo(VL_PHOTOGRAPHIC, "XC", regions=(SKIN_OF_BACK,)))
    assert reason == "anatomic region Skin of back (SCT 66643007) is not one the model reads"


def test_region_codes_from_context_groups_and_codes() -> None:
    codes = region_codes(("CID4209", "SCT:39937001"))
    assert ("SCT", "5665001") in codes and ("SCT", "39937001") in codes
    assert ("SCT", "66643007") in region_codes(("CID4029",))
    with pytest.raises(ValueError, match="unknown context group"):
        region_codes(("CID999999",))
    with pytest.raises(ValueError, match="neither"):
        region_codes(("39937001",))


def ct_series(part: str) -> Series:
    """Twelve 2.5 mm axial CT slices whose Body Part Examined is ``part``."""
    instances = []
    for k in range(12):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = f"1.2.3.1.{k + 1}"
        ds.Modality = "CT"
        ds.Rows = ds.Columns = 16
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BodyPartExamined = part
        ds.SliceThickness = "2.5"
        instances.append(Instance(Path(f"{k}.dcm"), ds))
    return Series("1.2.3.4", instances)


@pytest.mark.parametrize("part", ["CHEST", "THORAX", "CHESTABDOMEN", "CHESTABDPELVIS",
                                  "NECKCHESTABDPELV", "WHOLEBODY"])
def test_shipped_ct_model_reads_the_annex_l_terms_of_ct_that_include_the_chest(
        part: str) -> None:
    import json

    meta = Path(__file__).resolve().parents[2] / "models" / "ct-lung" / "configs" / \
        "metadata.json"
    accepts = json.loads(meta.read_text())["dicom_ai"]["accepts"]
    series = ct_series(part)
    assert not_applicable(accepts, series) is None and unfit(accepts, series) is None
    assert unfit(accepts, ct_series("HEAD")) == (
        "body part examined is HEAD, the model reads CHEST, THORAX, LUNG, CHESTABDOMEN, "
        "CHESTABDPELVIS and 6 more")
