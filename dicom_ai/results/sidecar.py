"""``findings.json``: the machine-readable twin of the SRs of one study."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dicom_ai import DISCLAIMER
from dicom_ai.inference.findings import ModelResult
from dicom_ai.results.impression import impression


def findings_document(study_instance_uid: str, results: Sequence[ModelResult], *,
                      language: str = "en",
                      skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``findings.json`` document of one study.

    Parameters
    ----------
    study_instance_uid:
        The study the results belong to.
    results:
        Every model result of the study, in processing order.
    language:
        Language of the Impression (``output.language``).
    skipped:
        Series no model applies to: Series Instance UID → reason, for the Impression.

    Returns
    -------
    dict
        ``{"study_instance_uid", "disclaimer", "impression", "results": [ModelResult.to_json(),
        ...]}``; probabilities and values are rounded as in the SR; the Impression is the
        AI-drafted text of :func:`dicom_ai.results.impression.impression`.
    """
    return {
        "study_instance_uid": study_instance_uid,
        "disclaimer": DISCLAIMER,
        "impression": impression(results, language, skipped=skipped),
        "results": [r.to_json() for r in results],
    }
