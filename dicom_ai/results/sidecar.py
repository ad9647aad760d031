"""``findings.json``: the machine-readable twin of the SRs of one study."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dicom_ai import DISCLAIMER
from dicom_ai.inference.findings import ModelResult


def findings_document(study_instance_uid: str, results: Sequence[ModelResult]) -> dict[str, Any]:
    """The ``findings.json`` document of one study.

    Parameters
    ----------
    study_instance_uid:
        The study the results belong to.
    results:
        Every model result of the study, in processing order.

    Returns
    -------
    dict
        ``{"study_instance_uid", "disclaimer", "results": [ModelResult.to_json(), ...]}``;
        probabilities and values are rounded as in the SR.
    """
    return {
        "study_instance_uid": study_instance_uid,
        "disclaimer": DISCLAIMER,
        "results": [r.to_json() for r in results],
    }
