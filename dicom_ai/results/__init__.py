"""Results as DICOM: Secondary Captures with heatmaps, then a TID 1500 SR that references them.

:func:`build_outputs` is what the pipeline calls once per :class:`ModelResult`;
:func:`output_filename` names the files; :func:`findings_document` builds ``findings.json``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_ai.config import OutputSettings
from dicom_ai.inference.findings import ModelResult
from dicom_ai.results.codes import CodeSpec
from dicom_ai.results.sc import build_secondary_capture
from dicom_ai.results.sidecar import findings_document
from dicom_ai.results.sr import build_sr
from dicom_ai.results.uids import derive_uid


def output_filename(ds: Dataset) -> str:
    """``sc-<SOPInstanceUID>.dcm`` for a Secondary Capture, ``sr-<SOPInstanceUID>.dcm`` for
    an SR: stable across replays because the UIDs are."""
    kind = "sc" if ds.SOPClassUID == SecondaryCaptureImageStorage else "sr"
    return f"{kind}-{ds.SOPInstanceUID}.dcm"


def build_outputs(result: ModelResult, settings: OutputSettings, *,
                  codes: Mapping[str, CodeSpec], finding_site: CodeSpec | None) -> list[Dataset]:
    """All DICOM objects of one model result: one SC per explanation, then the SR.

    Parameters
    ----------
    result:
        The model's findings (or rejection) on one series. The file names of the objects
        (:func:`output_filename`) are appended to ``result.outputs``, in order.
    settings:
        UID root, manufacturer, institution; ``secondary_captures`` false skips the SCs.
    codes:
        Finding codes by label from the bundle (``{"value", "scheme", "meaning"}``).
    finding_site:
        The bundle's finding site code, or ``None``.

    Returns
    -------
    list of pydicom.dataset.Dataset
        The SCs (none for a rejected result) followed by the SR, which references them.
    """
    scs: list[Dataset] = []
    if settings.secondary_captures and result.status == "ok":
        scs = [build_secondary_capture(e, result, settings, index=i)
               for i, e in enumerate(result.explanations)]
    sr = build_sr(result, settings, codes=codes, finding_site=finding_site,
                  secondary_captures=scs)
    outputs = [*scs, sr]
    result.outputs.extend(output_filename(ds) for ds in outputs)
    return outputs


__all__ = ["build_outputs", "derive_uid", "findings_document", "output_filename"]
