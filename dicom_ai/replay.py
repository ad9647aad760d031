"""``dicom-ai replay``: the pipeline over files on disk, with a per-file account of what happened.

Writes ``OUT/<StudyInstanceUID>/findings.json`` and the DICOM results of each study, and
``OUT/replay-summary.json`` with one entry per input file (processed, skipped or failed, with a
reason). Exit status: 0 when every input was processed or skipped for a stated reason, 2 when
some failed (each still reported), 1 when the run could not start.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from dicom_ai import DISCLAIMER
from dicom_ai.config import Settings
from dicom_ai.dicom.collect import Collection, collect
from dicom_ai.dicom.uid import require_uid
from dicom_ai.inference.bundle import Bundle
from dicom_ai.inference.findings import ModelResult
from dicom_ai.logs import log_failure, safe_error_text
from dicom_ai.pipeline import StudyOutcome, run_study
from dicom_ai.results.writer import write_results

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CANNOT_RUN, EXIT_SOME_FAILED = 0, 1, 2


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did: per-file entries, per-study outcomes, and the exit status."""

    entries: list[dict[str, Any]]
    outcomes: list[StudyOutcome]

    @property
    def exit_status(self) -> int:
        return EXIT_SOME_FAILED if any(e["status"] == "failed" for e in self.entries) \
            else EXIT_OK


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any name that would leave ``folder``."""
    path = folder / name
    if Path(name).name != name or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError("an output name would leave the output folder")
    return path


def write_outcome(outcome: StudyOutcome, out_dir: Path) -> Path:
    """Write a study's DICOM results and findings.json under ``out_dir/<study UID>/``.

    Raises
    ------
    InvalidUIDError
        When the Study Instance UID is not a UID (it names the folder).
    ValueError
        When an output name would leave ``out_dir``.
    """
    study_uid = require_uid(outcome.study_instance_uid, "Study Instance UID (0020,000D)")
    study_dir = _inside(out_dir, study_uid)
    write_results(study_dir, outcome.datasets, outcome.findings_document())
    return study_dir


def _file_entries(collection: Collection, outcomes: Sequence[StudyOutcome],
                  crashed: dict[str, str]) -> list[dict[str, Any]]:
    analysed: set[str] = set()
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for outcome in outcomes:
        analysed.update(r.series.series_instance_uid for r in outcome.results)
        skipped.update(outcome.skipped_series)
        failed.update(outcome.failed_files)
    entries = []
    for entry in collection.entries:
        record = entry.to_json()
        if entry.status == "ok":
            path = str(entry.path)
            if entry.study_instance_uid in crashed:
                record.update(status="failed", reason=crashed[entry.study_instance_uid])
            elif path in failed:
                record.update(status="failed", reason=failed[path])
            elif entry.series_instance_uid in analysed:
                record.update(status="processed", reason=None)
            else:
                record.update(status="skipped",
                              reason=skipped.get(entry.series_instance_uid or "",
                                                 "not part of an analysed series"))
        entries.append(record)
    return entries


def _headline(result: ModelResult) -> str:
    if result.status == "rejected":
        return f"rejected: {result.reason}"
    positives = [f for f in result.findings if f.positive]
    shown = positives or [max(result.findings, key=lambda f: f.probability or 0.0)] \
        if result.findings else []
    parts = [f"{f.label} {f.probability:.2f}" + (" +" if f.positive else "")
             for f in shown if f.probability is not None]
    values = [f"{f.label}={f.value:g}" for f in result.findings if f.value is not None]
    return ", ".join(parts + values) or "no finding"


def print_table(outcomes: Sequence[StudyOutcome], entries: Sequence[dict[str, Any]],
                stream: TextIO | None = None) -> None:
    """A readable table of results, then a one-line account of the input files."""
    stream = stream or sys.stdout
    rows = [("study", "series", "mod", "model", "status", "findings")]
    for outcome in outcomes:
        for r in outcome.results:
            rows.append((outcome.study_instance_uid[-12:], r.series.series_instance_uid[-12:],
                         r.series.modality, r.model.label, r.status,
                         _headline(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for n, row in enumerate(rows):
        stream.write("  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True))
                     + "  " + row[5] + "\n")
        if n == 0:
            stream.write("  ".join("-" * w for w in widths) + "  --------\n")
    left_out = Counter(model.label for outcome in outcomes
                       for _, model, _ in outcome.routed_elsewhere)
    if left_out:
        stream.write("\nLeft to the model for the series' anatomy (routed_elsewhere in "
                     "findings.json): "
                     + ", ".join(f"{name} on {n} series" for name, n in sorted(left_out.items()))
                     + ".\n")
    counts = Counter(e["status"] for e in entries)
    stream.write(f"\n{len(entries)} files: {counts.get('processed', 0)} processed, "
                 f"{counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed. "
                 f"{DISCLAIMER}.\n")


def replay(folder: Path, out_dir: Path, models: Sequence[Bundle], settings: Settings, *,
           progress: bool = True) -> ReplayReport:
    """Run the pipeline over every study found under ``folder`` and write the results."""
    collection = collect(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[StudyOutcome] = []
    crashed: dict[str, str] = {}
    studies = tqdm(collection.studies, desc="studies", unit="study", disable=not progress,
                   file=sys.stderr, leave=False)
    for study in studies:
        try:
            outcome = run_study(study, models, settings)
            write_outcome(outcome, out_dir)
        except Exception as exc:  # one bad study must not stop the replay
            log_failure(log, f"study {study.study_instance_uid} failed", exc)
            crashed[study.study_instance_uid] = f"internal error: {safe_error_text(exc)}"
            continue
        outcomes.append(outcome)
    entries = _file_entries(collection, outcomes, crashed)
    summary = json.dumps(entries, indent=2).encode() + b"\n"
    _write_atomic(out_dir / "replay-summary.json", summary)
    return ReplayReport(entries=entries, outcomes=outcomes)
