"""Results as DICOM: Secondary Captures with heatmaps, Segmentations of CT candidates, then a
TID 1500 SR that references them.

:func:`build_outputs` is what the pipeline calls once per model and study;
:func:`output_filename` names the files; :func:`findings_document` builds ``findings.json``;
:mod:`dicom_ai.results.writer` writes them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from dicom_ai.config import OutputSettings
from dicom_ai.inference.findings import ModelResult
from dicom_ai.results.codes import CodeSpec
from dicom_ai.results.sc import build_secondary_capture
from dicom_ai.results.seg import build_segmentation
from dicom_ai.results.sidecar import findings_document
from dicom_ai.results.sr import build_sr
from dicom_ai.results.uids import derive_uid


def output_filename(ds: Dataset) -> str:
    """``sc-<SOPInstanceUID>.dcm`` for a Secondary Capture, ``seg-…`` for a Segmentation,
    ``sr-…`` for an SR: stable across replays because the UIDs are."""
    kinds: dict[str, str] = {SecondaryCaptureImageStorage: "sc", SegmentationStorage: "seg"}
    kind = kinds.get(str(ds.SOPClassUID), "sr")
    return f"{kind}-{ds.SOPInstanceUID}.dcm"


def build_outputs(results: Sequence[ModelResult], settings: OutputSettings, *,
                  codes: Mapping[str, CodeSpec], finding_site: CodeSpec | None) -> list[Dataset]:
    """All DICOM objects of one model on one study: one SC per explanation, one SEG per result
    with reported CT candidates, then one SR.

    Parameters
    ----------
    results:
        The model's findings (or rejections) on the series of one study. The file names of
        each result's SCs and SEG and of the shared SR (:func:`output_filename`) are appended
        to its ``outputs``, in order.
    settings:
        UID root, manufacturer, institution; ``secondary_captures`` false skips the SCs.
    codes:
        Finding codes by label from the bundle (``{"value", "scheme", "meaning"}``).
    finding_site:
        The bundle's finding site code, or ``None``.

    Returns
    -------
    list of pydicom.dataset.Dataset
        The SCs (none for a rejected result) and SEGs followed by the SR, which references
        them.
    """
    per_result: list[list[Dataset]] = [
        [build_secondary_capture(e, result, settings, index=i)
         for i, e in enumerate(result.explanations)]
        if settings.secondary_captures and result.status == "ok" else []
        for result in results]
    segs = [build_segmentation(result, settings, codes=codes) for result in results]
    scs = [sc for group in per_result for sc in group]
    sr = build_sr(results, settings, codes=codes, finding_site=finding_site,
                  secondary_captures=scs, segmentations=[s for s in segs if s is not None])
    for result, own, seg in zip(results, per_result, segs, strict=True):
        mine = [*own, *([seg.dataset] if seg is not None else []), sr]
        result.outputs.extend(output_filename(ds) for ds in mine)
    return [*scs, *(s.dataset for s in segs if s is not None), sr]


__all__ = ["build_outputs", "derive_uid", "findings_document", "output_filename"]
