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

import highdicom as hd
import numpy as np
from highdicom.sr import (
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
from dicom_ai.inference.findings import Finding, ModelResult
from dicom_ai.results import codes as c
from dicom_ai.results.codes import CodeSpec
from dicom_ai.results.equipment import AlgorithmEquipment
from dicom_ai.results.reference import reference_header
from dicom_ai.results.sc import series_description
from dicom_ai.results.uids import derive_uid

#: Series Number of our SR series (fixed, so a replay keeps it; the UID carries identity).
SR_SERIES_NUMBER = 9900


def finding_type(label: str, codes: Mapping[str, CodeSpec]) -> CodedConcept:
    """The bundle's code for ``label``, or a private code naming the label when it has none."""
    return c.concept(codes[label]) if label in codes else c.private_code(label)


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


class _Context:
    """What every measurement group of one result shares."""

    def __init__(self, result: ModelResult, settings: OutputSettings,
                 codes: Mapping[str, CodeSpec], site: CodedConcept | None,
                 secondary_captures: Sequence[Dataset]) -> None:
        self.result = result
        self.settings = settings
        self.codes = codes
        self.site = site
        self.instances: dict[str, Instance] = {
            i.SOPInstanceUID: i for i in result.series.instances}
        self.secondary_captures = secondary_captures
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


def _append(group: hd.sr.MeasurementsAndQualitativeEvaluations,
            items: Sequence[ImageContentItem | TextContentItem]) -> None:
    """Add rows highdicom's constructor does not take: the IMAGE reference to our SC and TEXT
    comments (TID 1501 is extensible; highdicom's reader skips them)."""
    group[0].ContentSequence.extend(items)


def finding_group(finding: Finding, index: int,
                  ctx: _Context) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one finding: classification, quantity or localized candidate."""
    js = finding.to_json()
    sites = [ctx.site] if ctx.site is not None else []
    category: CodedConcept | None = None
    measurements: list[hd.sr.Measurement] = []
    notes: list[TextContentItem] = []
    kind = finding_type(finding.label, ctx.codes)
    if finding.value is not None:
        quantity = quantity_code(finding.label, ctx.codes, ctx.site)
        if finding.probability is None:
            # A pure measurement's "finding" is the measured organ (category Anatomical
            # Structure), as TID 1501 groups for organ volumes do.
            category = c.ANATOMICAL_STRUCTURE
            kind = quantity.site or quantity.name
            sites = [quantity.site] if quantity.site is not None else []
        if math.isfinite(finding.value):
            measurements.append(hd.sr.Measurement(
                name=quantity.name, value=js["value"], unit=c.ucum(finding.unit or "1")))
        else:
            # A DS value cannot be NaN; say so instead of inventing a number.
            notes.append(TextContentItem(
                name=c.COMMENT, value=f"{quantity.name.meaning}: not measurable",
                relationship_type=RelationshipTypeValues.CONTAINS))
    coordinates = []
    if finding.center_mm is not None and ctx.frame_of_reference is not None:
        coordinates = [hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([js["center_mm"]], dtype=np.float64),
            frame_of_reference_uid=ctx.frame_of_reference)]
    if finding.probability is not None:
        measurements.append(hd.sr.Measurement(
            name=c.PROBABILITY, value=js["probability"], unit=c.NO_UNITS,
            referenced_coordinates=coordinates or None))
    if finding.extent_mm is not None:
        measurements.append(hd.sr.Measurement(
            name=c.LONG_AXIS, value=max(js["extent_mm"]), unit=c.MILLIMETER,
            referenced_coordinates=coordinates or None))
    evaluations = []
    if finding.positive is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=kind, value=c.PRESENT if finding.positive else c.ABSENT))
    sources = ctx.source_images(finding.slices)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ctx.uid(f"tracking:{index}:{finding.label}"),
            identifier=f"{ctx.result.model.name} {finding.label} #{index + 1}"[:64]),
        finding_type=kind,
        finding_category=category,
        algorithm_id=ctx.algorithm,
        finding_sites=[hd.sr.FindingSite(s) for s in sites] or None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=sources,
    )
    _append(group, [*ctx.illustrations(sources), *notes])
    return group


def statement_group(ctx: _Context, *, analysed: bool,
                    text: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group without any finding: "not analysed because …", or "analysed, nothing found"."""
    evaluations = [] if analysed else [
        hd.sr.QualitativeEvaluation(name=c.ANALYSIS_PERFORMED, value=c.NOT_PERFORMED)]
    sources = ctx.source_images(())
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ctx.uid("tracking:statement"),
            identifier=f"{ctx.result.model.name} {'no findings' if analysed else 'not analysed'}"),
        algorithm_id=ctx.algorithm,
        qualitative_evaluations=evaluations or None,
        source_images=sources,
    )
    _append(group, [TextContentItem(name=c.COMMENT, value=text,
                                    relationship_type=RelationshipTypeValues.CONTAINS)])
    return group


def measurement_groups(ctx: _Context) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per finding; a rejected result (or one without findings) gets one statement."""
    result = ctx.result
    if result.status == "rejected":
        return [statement_group(ctx, analysed=False,
                                text=f"Not analysed: {result.reason or 'input rejected'}")]
    if not result.findings:
        return [statement_group(ctx, analysed=True, text="Analysed; the model reported no "
                                                         "findings")]
    return [finding_group(f, i, ctx) for i, f in enumerate(result.findings)]


def _complete_deidentification(sr: Dataset) -> None:
    """A source marked de-identified must say how (Type 1C); some leave the method empty.
    State that the source did not say, instead of copying an invalid empty value."""
    if (str(sr.get("PatientIdentityRemoved", "")).upper() == "YES"
            and not sr.get("DeidentificationMethod")
            and not sr.get("DeidentificationMethodCodeSequence")):
        sr.DeidentificationMethod = "not stated in the source images"


def build_sr(results: Sequence[ModelResult], settings: OutputSettings, *,
             codes: Mapping[str, CodeSpec], finding_site: CodeSpec | None,
             secondary_captures: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
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

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        UNVERIFIED, COMPLETE, PRELIMINARY; in the source's study, a new deterministic series.
    """
    if not results:
        raise ValueError("an SR needs at least one model result")
    site = c.concept(finding_site) if finding_site else None
    contexts = [_Context(r, settings, codes, site, secondary_captures) for r in results]
    result = results[0]
    model = result.model
    sources = [uid for ctx in contexts for uid in ctx.instances]
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.name, manufacturer_name=model.manufacturer,
            model_name=f"{model.name} {model.version}"[:64]))
    header = result.series.header
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c.procedure_reported(header, site),
        imaging_measurements=[g for ctx in contexts for g in measurement_groups(ctx)],
    )
    disclaimer = ContainerContentItem(name=c.QUALITATIVE_EVALUATIONS,
                                      relationship_type=RelationshipTypeValues.CONTAINS)
    disclaimer.ContentSequence = ContentSequence([TextContentItem(
        name=c.COMMENT, value=DISCLAIMER, relationship_type=RelationshipTypeValues.CONTAINS)])
    report[0].ContentSequence.append(disclaimer)
    started = result.started
    equipment = AlgorithmEquipment(model, institution_name=settings.institution_name,
                                   contribution_datetime=started)
    evidence = [reference_header(header), *(i.header for i in result.series.instances[1:]),
                *(i.header for r in results[1:] for i in r.series.instances),
                *secondary_captures]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=derive_uid(sources, model, "sr-series", root=settings.uid_root),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derive_uid(sources, model, "sr", root=settings.uid_root),
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
