"""The TID 1500 Measurement Report (Comprehensive 3D SR) of one model on one series.

The tree, every code and how a rejected input looks are in ``docs/sr-template.md``. In short::

    Imaging Measurement Report (TID 1500)
      ├ Language, observer = the model as a device, Procedure reported
      ├ Imaging Measurements
      │   └ Measurement Group (TID 1501), one per finding: tracking id + UID, finding category/
      │     type, finding site, algorithm (TID 4019), source images, Probability (TID 300,
      │     UCUM "1"), size, present/absent, "Best illustration of finding" → our SC
      └ Qualitative Evaluations: TEXT Comment "AI generated — not for diagnostic use"

Numbers are rounded exactly as :meth:`Finding.to_json` rounds them, so the SR and
``findings.json`` agree to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai import DISCLAIMER
from dicom_ai.config import OutputSettings
from dicom_ai.dicom.model import Instance
from dicom_ai.inference.findings import BoxPx, Finding, ModelResult
from dicom_ai.results import codes as c
from dicom_ai.results.codes import CodeSpec
from dicom_ai.results.equipment import AlgorithmEquipment
from dicom_ai.results.impression import finding_line, impression, result_sentence
from dicom_ai.results.reference import reference_header
from dicom_ai.results.sc import series_description
from dicom_ai.results.seg import Segmentation
from dicom_ai.results.uids import content_key, derive_uid

#: Series Number of our SR series (fixed, so a replay keeps it; the UID carries identity).
SR_SERIES_NUMBER = 9900
#: Image-level markers (fractions of the image's width and height): left edge and side of the
#: rectangle, top of the first one and the step down to the next; after MARKER_ROWS they start
#: over at the top.
MARKER_LEFT, MARKER_SIDE, MARKER_TOP, MARKER_STEP, MARKER_ROWS = 0.02, 0.04, 0.04, 0.07, 13


finding_type = c.finding_concept


def quantity_code(label: str, codes: Mapping[str, CodeSpec],
                  site: CodedConcept | None) -> c.QuantityCode:
    """Measured concept and site of a quantitative finding: bundle code, then the default
    table, then a private code; the site is the table's, else the model's finding site."""
    default = c.DEFAULT_QUANTITY_CODES.get(label)
    if label in codes:
        name = c.concept(codes[label])
    elif default is not None:
        name = default.name
    else:
        name = c.private_code(label)
    return c.QuantityCode(name, default.site if default and default.site else site)


def box_polyline(box: BoxPx) -> npt.NDArray[np.float64]:
    """A box as a closed POLYLINE (5 points, the first repeated): the rectangle form that OHIF
    draws and Cornerstone's RectangleROI reads (4 or 5 points)."""
    c0, r0, c1, r1 = (float(v) for v in box)
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)


def whole_image(instance: Instance) -> BoxPx:
    """The box covering an image: (0, 0) to (Columns, Rows) in SCOORD pixel coordinates."""
    return 0.0, 0.0, float(instance.header.Columns), float(instance.header.Rows)


class _Context:
    """What every measurement group of one result shares."""

    def __init__(self, result: ModelResult, settings: OutputSettings,
                 codes: Mapping[str, CodeSpec], site: CodedConcept | None,
                 secondary_captures: Sequence[Dataset],
                 segments: Mapping[int, tuple[Dataset, int]]) -> None:
        self.result = result
        self.settings = settings
        self.codes = codes
        self.site = site
        self.instances: dict[str, Instance] = {
            i.SOPInstanceUID: i for i in result.series.instances}
        self.secondary_captures = secondary_captures
        self.segments = segments
        #: Image-level markers placed so far, per image (their stacking order).
        self.markers: dict[str, int] = {}
        self.algorithm = hd.sr.AlgorithmIdentification(
            name=result.model.name, version=result.model.version,
            manufacturer=result.model.manufacturer)
        frame_of_reference = result.series.header.get("FrameOfReferenceUID")
        self.frame_of_reference = str(frame_of_reference) if frame_of_reference else None

    def uid(self, kind: str) -> str:
        return derive_uid(self.instances, self.result.model, kind, root=self.settings.uid_root)

    def source_images(self, slices: Sequence[str]) -> list[hd.sr.SourceImageForMeasurementGroup]:
        """The finding's slices, or the whole series for a whole-series finding. A slice that
        is not in the series cannot be referenced (its SOP class is unknown) and is skipped."""
        uids = [u for u in slices if u in self.instances] or list(self.instances)
        return [hd.sr.SourceImageForMeasurementGroup(self.instances[u].SOPClassUID, u)
                for u in uids]

    def anchor(self, finding: Finding | None) -> tuple[Instance, BoxPx]:
        """The image a group's 2D coordinates are on, and the box on it.

        The finding's own image and box; a finding without a box covers its image; without
        an image (a measurement of the whole series, a rejection), the middle one of its
        slices or of the series stands for it — viewers need one image to draw a group on.
        """
        if finding is not None and finding.image_uid in self.instances:
            image = self.instances[str(finding.image_uid)]
            return image, finding.bbox_px or whole_image(image)
        slices = [self.instances[u] for u in (finding.slices if finding else ())
                  if u in self.instances]
        candidates = slices or self.result.series.instances
        image = candidates[len(candidates) // 2]
        return image, whole_image(image)

    def marker(self, image: Instance) -> BoxPx:
        """The region of the next image-level finding on ``image``: a small rectangle at the
        image's left edge, one below the other.

        An image-level finding concerns the whole image, but OHIF places a group's label at
        the right end and vertical middle of its region, unclamped (``cornerstone-dicom-sr``
        ``renderTextBox``): a whole-image region puts the label beyond the viewport's right
        border and every image-level label of the image on one spot. Left-edge markers stacked
        down the image give each label its own line over the image.
        """
        k = self.markers.get(image.SOPInstanceUID, 0) % MARKER_ROWS
        self.markers[image.SOPInstanceUID] = k + 1
        _, _, cols, rows = whole_image(image)
        top = (MARKER_TOP + MARKER_STEP * k) * rows
        return (MARKER_LEFT * cols, top, (MARKER_LEFT + MARKER_SIDE) * cols,
                top + MARKER_SIDE * rows)

    def region(self, finding: Finding | None) -> hd.sr.CoordinatesForMeasurement:
        """The finding's 2D region (INFERRED FROM its first NUM), SELECTED FROM its image: its
        box, else an image-level marker (:meth:`marker`)."""
        image, box = self.anchor(finding)
        if finding is None or finding.bbox_px is None or finding.image_uid != image.SOPInstanceUID:
            box = self.marker(image)
        return hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box_polyline(box),
            source_image=hd.sr.SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID))

    def illustrations(self, sources: Sequence[hd.sr.SourceImageForMeasurementGroup]
                      ) -> list[ImageContentItem]:
        """References to our Secondary Captures made from any of ``sources``."""
        source_uids = {s.referenced_sop_instance_uid for s in sources}
        return [
            ImageContentItem(name=c.BEST_ILLUSTRATION,
                             referenced_sop_class_uid=sc.SOPClassUID,
                             referenced_sop_instance_uid=sc.SOPInstanceUID,
                             relationship_type=RelationshipTypeValues.CONTAINS)
            for sc in self.secondary_captures
            if sc.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
        ]

    def comment(self, text: str) -> TextContentItem:
        return TextContentItem(name=c.COMMENT, value=text,
                               relationship_type=RelationshipTypeValues.CONTAINS)


Group = hd.sr.MeasurementsAndQualitativeEvaluations


def _append(group: Group | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
            items: Sequence[ImageContentItem | TextContentItem]) -> None:
    """Add rows highdicom's constructor does not take: the IMAGE reference to our SC and TEXT
    comments (TID 1501 is extensible; highdicom's reader skips them)."""
    group[0].ContentSequence.extend(items)


def _num(name: CodedConcept, value: float, unit: CodedConcept, *,
         coordinates: Sequence[hd.sr.CoordinatesForMeasurement
                               | hd.sr.CoordinatesForMeasurement3D] = ()) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=value, unit=unit,
                             referenced_coordinates=list(coordinates) or None)


def finding_group(finding: Finding, index: int, ctx: _Context) -> Group:
    """One measurement group for one finding: classification, quantity or localized candidate.

    The first NUM is INFERRED FROM the finding's 2D region on its image (a box, a whole image,
    a CT candidate's key slice): OHIF draws a group from the coordinates of its NUMs and needs
    the first one to be 2D (``extension-cornerstone-dicom-sr`` reads ``coords[0]``
    ``.ReferencedSOPSequence``); a CT candidate's 3D point is kept on its second NUM. A
    candidate with a segment in our DICOM Segmentation is a TID 1411 group referencing it.
    """
    js = finding.to_json()
    sites = [c.concept(dict(zip(("value", "scheme", "meaning"), finding.site, strict=True)))
             ] if finding.site else [ctx.site] if ctx.site is not None else []
    category: CodedConcept | None = None
    kind = finding_type(finding.label, ctx.codes)
    # (concept, value, unit, 3D point or none): in this order, the first carries the region.
    rows: list[tuple[CodedConcept, float, CodedConcept, bool]] = []
    if finding.value is not None:
        quantity = quantity_code(finding.label, ctx.codes, ctx.site)
        if finding.probability is None:
            # A pure measurement's "finding" is the measured organ (category Anatomical
            # Structure), as TID 1501 groups for organ volumes do.
            category = c.ANATOMICAL_STRUCTURE
            kind = quantity.site or quantity.name
            sites = [quantity.site] if quantity.site is not None else []
        if math.isfinite(finding.value):
            rows.append((quantity.name, js["value"], c.ucum(finding.unit or "1"), False))
    if finding.probability is not None:
        rows.append((c.PROBABILITY, js["probability"], c.NO_UNITS, False))
    if finding.extent_mm is not None:
        rows.append((c.LONG_AXIS, max(js["extent_mm"]), c.MILLIMETER, True))
    point: list[hd.sr.CoordinatesForMeasurement3D] = []
    if finding.center_mm is not None and ctx.frame_of_reference is not None:
        point = [hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([js["center_mm"]], dtype=np.float64),
            frame_of_reference_uid=ctx.frame_of_reference)]
    region = ctx.region(finding)
    measurements = [
        _num(name, value, unit,
             coordinates=[region] if n == 0 else point if takes_point else [])
        for n, (name, value, unit, takes_point) in enumerate(rows)]
    evaluations = []
    if finding.positive is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=kind, value=c.PRESENT if finding.positive else c.ABSENT))
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=ctx.uid(f"tracking:{index}:{finding.label}"),
            identifier=f"{ctx.result.model.name} {finding.label} #{index + 1}"[:64]),
        "finding_type": kind,
        "finding_category": category,
        "algorithm_id": ctx.algorithm,
        "finding_sites": [hd.sr.FindingSite(s) for s in sites] or None,
        "measurements": measurements or None,
        "qualitative_evaluations": evaluations or None,
    }
    sources = ctx.source_images(finding.slices or
                                ([finding.image_uid] if finding.image_uid else []))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(source_images=sources, **common)
    segment = []
    if index in ctx.segments:
        seg, number = ctx.segments[index]
        segment = [ImageContentItem(name=c.BEST_ILLUSTRATION,
                                    referenced_sop_class_uid=seg.SOPClassUID,
                                    referenced_sop_instance_uid=seg.SOPInstanceUID,
                                    referenced_segment_numbers=number,
                                    relationship_type=RelationshipTypeValues.CONTAINS)]
    _append(group, [ctx.comment(finding_line(finding, ctx.settings.language)),
                    *ctx.illustrations(sources), *segment])
    return group


def statements(ctx: _Context) -> list[CodeContentItem | TextContentItem]:
    """What a result says without a number, for the report-level Qualitative Evaluations:
    "Analysis Performed: Not performed" and why, for a result that was not analysed; Present/
    Absent and its line for a verdict-only finding (e.g. "multiple fractures").

    They are not measurement groups: OHIF can only show a group with a region on an image, a
    TID 1501 group can carry one only in a NUM, and PixelMed's validator refuses a report that
    mixes TID 1410 groups (which could hold a region without a NUM) with TID 1501 groups.
    """
    result = ctx.result
    language = ctx.settings.language
    if result.status == "rejected":
        return [CodeContentItem(name=c.ANALYSIS_PERFORMED, value=c.NOT_PERFORMED,
                                relationship_type=RelationshipTypeValues.CONTAINS),
                ctx.comment(result_sentence(result, language))]
    items: list[CodeContentItem | TextContentItem] = []
    for f in result.findings:
        if f.positive is not None and not has_number(f) and f.value is None:
            items += [CodeContentItem(name=finding_type(f.label, ctx.codes),
                                      value=c.PRESENT if f.positive else c.ABSENT,
                                      relationship_type=RelationshipTypeValues.CONTAINS),
                      ctx.comment(finding_line(f, language))]
    return items


def region_group(ctx: _Context) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The group of a result in an SR that has no other: a TID 1410 group whose top-level
    Image Region covers the middle image of the series (so that a viewer opens the image),
    "Analysis Performed: Not performed" for a result that was not analysed, and the result's
    sentence as a TEXT Comment. An SR needs one measurement group (highdicom, TID 1500), and
    PixelMed accepts TID 1410 groups only in a report that has no TID 1501 group."""
    image, box = ctx.anchor(None)
    rejected = ctx.result.status == "rejected"
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ctx.uid("tracking:statement"),
            identifier=f"{ctx.result.model.name} {'not analysed' if rejected else 'no findings'}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box_polyline(box),
            source_image=hd.sr.SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID)),
        algorithm_id=ctx.algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=c.ANALYSIS_PERFORMED, value=c.NOT_PERFORMED)] if rejected else None,
    )
    _append(group, [ctx.comment(result_sentence(ctx.result, ctx.settings.language))])
    return group


def _reading_order(result: ModelResult) -> list[tuple[int, Finding]]:
    """The reported findings with their indices (which the tracking UIDs derive from).

    Candidates below the operating point get no group: drawn on the image they read as findings
    (and, several on one slice, their labels overlap in OHIF). They stay in ``findings.json``
    and are counted in the Impression."""
    return [p for p in enumerate(result.findings) if not p[1].below_operating_point]


def has_number(finding: Finding) -> bool:
    """Whether a finding has a number for a NUM. A measurement that came out NaN has none (a
    DS cannot hold it, and a NUM without a value cannot carry the coordinates viewers need)."""
    return finding.probability is not None or (
        finding.value is not None and math.isfinite(finding.value))


def measurement_groups(ctx: _Context) -> list[Group]:
    """One group per finding with a number (a NaN measurement has none: the Impression says
    "not measurable"); what has no number goes to :func:`statements`."""
    if ctx.result.status == "rejected":
        return []
    return [finding_group(f, i, ctx) for i, f in _reading_order(ctx.result) if has_number(f)]


def _complete_deidentification(sr: Dataset) -> None:
    """A source marked de-identified must say how (Type 1C); some leave the method empty.
    State that the source did not say, instead of copying an invalid empty value."""
    if (str(sr.get("PatientIdentityRemoved", "")).upper() == "YES"
            and not sr.get("DeidentificationMethod")
            and not sr.get("DeidentificationMethodCodeSequence")):
        sr.DeidentificationMethod = "not stated in the source images"


def build_sr(results: Sequence[ModelResult], settings: OutputSettings, *,
             codes: Mapping[str, CodeSpec], finding_site: CodeSpec | None,
             secondary_captures: Sequence[Dataset] = (),
             segmentations: Sequence[Segmentation] = ()) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR of one model on one study.

    Parameters
    ----------
    results:
        Findings (or rejections) of one model on the series of one study, at least one; a
        study whose frontal film was analysed and whose lateral was rejected gets one SR that
        says both.
    settings:
        UID root, manufacturer and institution.
    codes:
        The bundle's finding codes by label (``metadata.json`` → ``dicom_ai.codes``).
    finding_site:
        The bundle's finding site, or ``None``.
    secondary_captures:
        The SCs made for these results; groups reference those made from their source images.
    segmentations:
        The DICOM Segmentations made for these results (:mod:`dicom_ai.results.seg`): a
        finding with a segment becomes a TID 1411 group that references it.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        UNVERIFIED, COMPLETE, PRELIMINARY; in the source's study, a new deterministic series.
    """
    if not results:
        raise ValueError("an SR needs at least one model result")
    site = c.concept(finding_site) if finding_site else None
    contexts = [_Context(r, settings, codes, site, secondary_captures,
                         {i: (seg.dataset, n) for seg in segmentations if seg.result is r
                          for i, n in seg.segments.items()})
                for r in results]
    result = results[0]
    model = result.model
    sources = [uid for ctx in contexts for uid in ctx.instances]
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.name, manufacturer_name=model.manufacturer,
            model_name=model.label[:64]))
    header = result.series.header
    groups: list[Group | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        g for ctx in contexts for g in measurement_groups(ctx)]
    # Without any finding group, each result states itself in a region group instead.
    stated = [] if groups else [ctx for ctx in contexts if ctx.result.status == "rejected"]
    groups = groups or [region_group(ctx) for ctx in contexts]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c.procedure_reported(header),
        imaging_measurements=groups,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            c.LANGUAGE_CODES[settings.language]),
    )
    evaluations = ContainerContentItem(name=c.QUALITATIVE_EVALUATIONS,
                                       relationship_type=RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = ContentSequence([
        *(item for ctx in contexts if ctx not in stated for item in statements(ctx)),
        TextContentItem(name=c.IMPRESSION,
                        value=impression(results, settings.language),
                        relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=c.COMMENT, value=DISCLAIMER,
                        relationship_type=RelationshipTypeValues.CONTAINS)])
    report[0].ContentSequence.append(evaluations)
    started = result.started
    equipment = AlgorithmEquipment(model, institution_name=settings.institution_name,
                                   contribution_datetime=started)
    evidence = [reference_header(header), *(i.header for i in result.series.instances[1:]),
                *(i.header for r in results[1:] for i in r.series.instances),
                *secondary_captures, *(seg.dataset for seg in segmentations)]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=derive_uid(sources, model, "sr-series", root=settings.uid_root),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derive_uid(sources, model, "sr", root=settings.uid_root,
                                    content=content_key(
                                        results, settings.language, settings.manufacturer,
                                        settings.institution_name,
                                        [str(d.SOPInstanceUID) for d in secondary_captures],
                                        [str(g.dataset.SOPInstanceUID) for g in segmentations])),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name or None,
        series_description=series_description("RESULT", result),
        series_date=started.date(),
        series_time=started.time(),
        content_date=started.date(),
        content_time=started.time(),
        manufacturer_model_name=model.name,
        software_versions=model.version,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        # UTF-8: the disclaimer's em dash (and any source name) must survive encoding.
        specific_character_set="ISO_IR 192",
        contributing_equipment=[equipment],
        coding_schemes=c.coding_schemes([*report, equipment]) or None,
    )
    _complete_deidentification(sr)
    return sr
