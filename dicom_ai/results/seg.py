"""DICOM Segmentation of localized CT candidates, so that viewers overlay them on the slices.

One binary Segmentation (highdicom :class:`~highdicom.seg.Segmentation`) per result that has
reported candidates with a mask (:attr:`Finding.mask`): one segment per candidate at or above
its operating point, on the source slices it covers, in the source's study and frame of
reference. Candidates below the operating point are not segmented (the SR lists them as such).
Each segment carries the tracking UID of the candidate's SR measurement group, and the SR
group references the segment (TID 1411 "Referenced Segment").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from dicom_ai import DISCLAIMER
from dicom_ai.config import OutputSettings
from dicom_ai.inference.findings import Finding, ModelResult
from dicom_ai.results import codes as c
from dicom_ai.results.codes import CodeSpec
from dicom_ai.results.equipment import AlgorithmEquipment
from dicom_ai.results.reference import reference_header
from dicom_ai.results.sc import series_description
from dicom_ai.results.uids import content_key, derive_uid

#: Series Number of our SEG series (fixed, so a replay keeps it; the UID carries identity).
SEG_SERIES_NUMBER = 9902
#: Segmented Property Category of every candidate (CID 7150).
MORPHOLOGICALLY_ABNORMAL = CodedConcept("49755003", "SCT",
                                          "Morphologically abnormal structure")


#: Body Part Examined → the unpaired anatomic region of the Frame Anatomy macro.
UNPAIRED_REGIONS = {
    "CHEST": CodedConcept("51185008", "SCT", "Thorax"),
    "THORAX": CodedConcept("51185008", "SCT", "Thorax"),
    "LUNG": CodedConcept("51185008", "SCT", "Thorax"),
}


def _state_laterality(seg: hd.seg.Segmentation, body_part: str) -> None:
    """Say the laterality the way both validators accept it.

    Laterality (0020,0060) is Type 2C: dciodvfy forbids it unless Body Part Examined names a
    paired part, PixelMed requires it unless some Frame Laterality is present. For a chest the
    Frame Anatomy of the shared functional groups states both: the region (Thorax) and that it
    is unpaired (``U``). Any other body part: Body Part Examined copied, Laterality empty
    ("unknown", as for our Secondary Captures).
    """
    region = UNPAIRED_REGIONS.get(body_part)
    if body_part:
        seg.BodyPartExamined = body_part
    if region is None:
        seg.Laterality = ""
        return
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [region]
    anatomy.FrameLaterality = "U"
    seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]


@dataclass(frozen=True)
class Segmentation:
    """A built Segmentation and what it segments.

    Attributes
    ----------
    dataset:
        The SEG instance.
    result:
        The model result it was made from.
    segments:
        Index of a finding in ``result.findings`` → its segment number.
    """

    dataset: hd.seg.Segmentation
    result: ModelResult
    segments: dict[int, int]


def segmented(result: ModelResult) -> list[tuple[int, Finding]]:
    """The findings that get a segment: reported candidates (at or above the operating point)
    with a mask on slices of the series."""
    uids = {i.SOPInstanceUID for i in result.series.instances}
    return [(i, f) for i, f in enumerate(result.findings)
            if f.mask is not None and f.positive and f.mask.pixels.any()
            and set(f.mask.slices) <= uids]


def tracking_uid(result: ModelResult, index: int, finding: Finding, settings: OutputSettings
                 ) -> str:
    """The tracking UID of a finding, shared by its SR measurement group and its segment."""
    return derive_uid([i.SOPInstanceUID for i in result.series.instances], result.model,
                      f"tracking:{index}:{finding.label}", root=settings.uid_root)


def build_segmentation(result: ModelResult, settings: OutputSettings, *,
                       codes: Mapping[str, CodeSpec]) -> Segmentation | None:
    """The Segmentation of ``result``'s reported candidates, or ``None`` when it has none.

    Parameters
    ----------
    result:
        A CT result whose candidate findings carry a :class:`CandidateMask`.
    settings:
        UID root, manufacturer, institution.
    codes:
        The bundle's finding codes (the Segmented Property Type of each segment).

    Returns
    -------
    Segmentation or None
        Binary SEG over the source slices any segment touches (empty frames omitted), in the
        source's study, a new deterministic series.
    """
    chosen = segmented(result)
    if result.status != "ok" or not chosen:
        return None
    by_uid = {i.SOPInstanceUID: i for i in result.series.instances}
    # Source slices in series order: a frame per slice any segment touches.
    order = [i.SOPInstanceUID for i in result.series.instances
             if any(i.SOPInstanceUID in f.mask.slices for _, f in chosen if f.mask)]
    first = by_uid[order[0]].header
    planes = np.zeros((len(order), int(first.Rows), int(first.Columns), len(chosen)),
                      dtype=bool)
    descriptions = []
    segments: dict[int, int] = {}
    for number, (index, finding) in enumerate(chosen, start=1):
        assert finding.mask is not None  # chosen only holds masked findings
        for k, uid in enumerate(finding.mask.slices):
            planes[order.index(uid), ..., number - 1] |= finding.mask.pixels[k]
        segments[index] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"AI {finding.label} {number}"[:64],
            segmented_property_category=MORPHOLOGICALLY_ABNORMAL,
            segmented_property_type=c.finding_concept(finding.label, codes),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=result.model.name, version=result.model.version,
                family=dcm_codes.cid7162.ArtificialIntelligence),
            tracking_uid=tracking_uid(result, index, finding, settings),
            tracking_id=f"{result.model.name} {finding.label} #{index + 1}"[:64]))
    model = result.model
    sources = [i.SOPInstanceUID for i in result.series.instances]
    started = result.started
    masks_key = [[f.mask.slices, np.packbits(f.mask.pixels).tobytes().hex()]
                 for _, f in chosen if f.mask]
    seg = hd.seg.Segmentation(
        source_images=[reference_header(first), *(by_uid[u].header for u in order[1:])],
        pixel_array=planes,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(sources, model, "seg-series", root=settings.uid_root),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derive_uid(sources, model, "seg", root=settings.uid_root,
                                    content=content_key([result], masks_key)),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.device_uid[:64],
        content_label="AI_CANDIDATES",
        content_description=DISCLAIMER,
        series_description=series_description("SEGMENTATION", result),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[AlgorithmEquipment(
            model, institution_name=settings.institution_name, contribution_datetime=started)],
        omit_empty_frames=True,
    )
    # UTF-8: the disclaimer's em dash.
    seg.SpecificCharacterSet = "ISO_IR 192"
    seg.SeriesDate = seg.ContentDate = DA(started.date())
    seg.SeriesTime = seg.ContentTime = TM(started.time())
    if settings.institution_name:
        seg.InstitutionName = settings.institution_name
    _state_laterality(seg, str(first.get("BodyPartExamined", "") or "").upper())
    return Segmentation(dataset=seg, result=result, segments=segments)
