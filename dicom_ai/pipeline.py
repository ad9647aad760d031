"""Study → findings → DICOM objects: the one place the whole flow is visible.

Both ``dicom-ai replay`` and the service's worker call :func:`run_study`; nothing here knows
whether the study came from disk or over the network.

::

    study ──▶ for each series: routing.not_applicable / routing.unfit  (skip or reject, with reason;
              models for other anatomy left out when one model reads the series' anatomy)
          ──▶ task analyser (classification, ct-lung, detection) ──▶ ModelResult
          ──▶ results.build_outputs: Secondary Captures, CT candidate SEGs + TID 1500 SR
              (deterministic UIDs; results.writer writes them for replay and the service)
          ──▶ StudyOutcome (results, datasets to store/send, per-file outcome)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydicom.dataset import Dataset

from dicom_ai.config import InferenceSettings, Settings
from dicom_ai.dicom.errors import DicomInputError
from dicom_ai.dicom.model import Series, Study
from dicom_ai.dicom.pixels import decode_limit
from dicom_ai.inference import routing
from dicom_ai.inference.bundle import Bundle, BundleError, load_all, select_device
from dicom_ai.inference.findings import ModelInfo, ModelResult

log = logging.getLogger(__name__)

Analyser = Callable[[Bundle, Series, datetime, InferenceSettings],
                    tuple[ModelResult, dict[str, str]]]


def _analyser(task: str) -> Analyser:
    # Imported per task so that a deployment with only 2D models never imports the CT stack.
    if task == "classification":
        from dicom_ai.inference.classify import analyse_images
        return analyse_images
    if task == "ct-lung":
        from dicom_ai.inference.ct_lung import analyse_ct
        return analyse_ct
    if task == "detection":
        from dicom_ai.inference.detection import analyse_detection
        return analyse_detection
    if task == "xr-fracture":
        from dicom_ai.inference.fracture import analyse_fracture
        return analyse_fracture
    raise BundleError(f"no analyser for task {task!r}")


@dataclass
class StudyOutcome:
    """Everything one run over a study produced."""

    study_instance_uid: str
    results: list[ModelResult] = field(default_factory=list)
    #: Secondary Captures and SRs, in the order they should be stored (SCs before their SR).
    datasets: list[Dataset] = field(default_factory=list)
    #: Series no model applies to: Series Instance UID → reason.
    skipped_series: dict[str, str] = field(default_factory=dict)
    #: Models left out of a series because another model reads its anatomy and they do not:
    #: (Series Instance UID, model, reason), in processing order.
    routed_elsewhere: list[tuple[str, ModelInfo, str]] = field(default_factory=list)
    #: Files that could not be used: path → reason.
    failed_files: dict[str, str] = field(default_factory=dict)
    #: Language of the Impression (``output.language``).
    language: str = "en"
    #: Seconds each model (by name) spent analysing the study's series: decoding, the network
    #: and post-processing (the service's ``dicom_ai_inference_seconds``).
    inference_seconds: dict[str, float] = field(default_factory=dict)

    def findings_document(self) -> dict[str, Any]:
        """The ``findings.json`` document of this study."""
        from dicom_ai.results import findings_document

        document = findings_document(self.study_instance_uid, self.results,
                                     language=self.language, skipped=self.skipped_series)
        document["skipped_series"] = [{"series_instance_uid": uid, "reason": reason}
                                      for uid, reason in sorted(self.skipped_series.items())]
        document["routed_elsewhere"] = [
            {"series_instance_uid": uid, "model": model.to_json(), "reason": reason}
            for uid, model, reason in self.routed_elsewhere]
        return document


def load_models(settings: InferenceSettings, models_dir: Path | None = None
                ) -> tuple[list[Bundle], list[str]]:
    """Load every bundle once; returns the bundles and the problems of those that failed."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    device = select_device(settings.device)
    log.info("inference device: %s", device)
    return load_all(Path(models_dir or settings.models_dir), device=device)


def analyse_series(series: Series, models: Sequence[Bundle], settings: Settings,
                   started: datetime, outcome: StudyOutcome) -> None:
    """Route one series to the models that apply and collect their results into ``outcome``."""
    applicable: list[Bundle] = []
    reasons: list[str] = []
    for bundle in models:
        reason = routing.not_applicable(bundle.accepts, series)
        if reason is None:
            applicable.append(bundle)
        else:
            reasons.append(reason)
    if not applicable:
        outcome.skipped_series[series.series_instance_uid] = routing.skip_reason(series, reasons)
        return
    anatomy = [routing.wrong_anatomy(bundle.accepts, series) for bundle in applicable]
    # A hand film is the fracture detector's: the chest model leaves it out rather than put a
    # "not analysed" SR into every fracture study. Only when no model reads the anatomy (a
    # skull film) does each model's rejection say why nothing analysed the series.
    if None in anatomy:
        for bundle, reason in zip(applicable, anatomy, strict=True):
            if reason is not None:
                outcome.routed_elsewhere.append((series.series_instance_uid, bundle.info,
                                                 reason))
                log.info("series %s: %s left out, another model reads it (%s)",
                         series.series_instance_uid, bundle.info.label, reason)
        applicable = [b for b, reason in zip(applicable, anatomy, strict=True) if reason is None]
    for bundle in applicable:
        unfit = routing.unfit(bundle.accepts, series)
        if unfit is not None:
            result = ModelResult.rejected(series, bundle.info, started, unfit)
        else:
            began = time.perf_counter()
            try:
                result, failed = _analyser(bundle.task)(bundle, series, started,
                                                        settings.inference)
            except DicomInputError as exc:
                result, failed = ModelResult.rejected(series, bundle.info, started,
                                                      exc.reason), {}
            outcome.failed_files.update(failed)
            outcome.inference_seconds[bundle.name] = (
                outcome.inference_seconds.get(bundle.name, 0.0) + time.perf_counter() - began)
        log.info("series %s: %s → %s%s", series.series_instance_uid, bundle.info.label,
                 result.status, f" ({result.reason})" if result.reason else "")
        outcome.results.append(result)


def run_study(study: Study, models: Sequence[Bundle], settings: Settings, *,
              started: datetime | None = None) -> StudyOutcome:
    """Analyse every series of ``study`` with the models that apply, and build the DICOM
    results (Secondary Captures, then one SR per model)."""
    from dicom_ai.results import build_outputs

    started = started or datetime.now().astimezone()
    outcome = StudyOutcome(study_instance_uid=study.study_instance_uid,
                           language=settings.output.language)
    with decode_limit(settings.limits.max_decoded_mb,
                      max_volume_mb=settings.limits.max_volume_mb,
                      isolated_timeout_s=settings.limits.isolated_decode_timeout_s):
        for series in study.series:
            analyse_series(series, models, settings, started, outcome)
    # One SR per study and model: the results of one model on the study's series together.
    for bundle in models:
        results = [r for r in outcome.results if r.model == bundle.info]
        if results:
            outcome.datasets.extend(build_outputs(results, settings.output,
                                                  codes=bundle.dicom_ai.get("codes", {}),
                                                  finding_site=bundle.dicom_ai.get("finding_site")))
    return outcome
