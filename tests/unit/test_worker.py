"""Worker: outputs written before the job is done, one outbound row per object and destination,
failed attempts, interrupted jobs re-queued, supersession when the study re-opened."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_ai.dicom.errors import SeriesGeometryError
from dicom_ai.service import db
from dicom_ai.service.spool import Spool
from dicom_ai.service.studies import complete_quiet_studies, record_arrival
from dicom_ai.service.worker import ProcessedStudy, Worker, requeue_interrupted

STUDY = "1.2.826.0.1.3680043.8.498.30"


def result(sop: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = sop + ".0"
    return ds


class Recorder:
    """A processor that returns fixed objects and records what it was given."""

    def __init__(self, datasets: list[Dataset], error: Exception | None = None) -> None:
        self.datasets = datasets
        self.error = error
        self.calls: list[list[Path]] = []

    def __call__(self, paths: Sequence[Path]) -> ProcessedStudy:
        self.calls.append(list(paths))
        if self.error is not None:
            raise self.error
        return ProcessedStudy(self.datasets, {"study_instance_uid": STUDY})


def one(conn: sqlite3.Connection, sql: str) -> tuple[object, ...]:
    return tuple(conn.execute(sql).fetchone())


def setup(tmp_path: Path) -> tuple[Spool, sqlite3.Connection]:
    spool = Spool(tmp_path)
    conn = db.connect(spool.db_path)
    with db.transaction(conn):
        record_arrival(conn, STUDY, 100.0, new_instance=True)
        conn.execute("INSERT INTO instances VALUES ('1.2.3', ?, '1.2', '1.2.840.10008.5.1.4.1.1.2',"
                     " 'incoming/x/1.2.3.dcm', 10, 'CT1', 100.0)", (STUDY,))
    complete_quiet_studies(conn, 200.0, 30.0)
    return spool, conn


def test_job_writes_outputs_then_queues_each_for_each_destination(tmp_path: Path) -> None:
    spool, conn = setup(tmp_path)
    processor = Recorder([result("1.2.9.1", SecondaryCaptureImageStorage),
                          result("1.2.9.2", Comprehensive3DSRStorage)])
    worker = Worker(conn, spool, processor, destinations=["pacs", "web"], max_attempts=3)
    report = worker.run_once()
    assert report is not None and report.state == "done"
    assert processor.calls == [[tmp_path / "incoming/x/1.2.3.dcm"]]
    out = tmp_path / "outputs" / STUDY
    # The names replay writes too (dicom_ai.results.writer), which findings.json lists.
    assert pydicom.dcmread(out / "sr-1.2.9.2.dcm").SOPClassUID == Comprehensive3DSRStorage
    assert json.loads((out / "findings.json").read_text()) == {"study_instance_uid": STUDY}
    rows = conn.execute("SELECT sop_instance_uid, destination, state, path FROM outbound "
                        "ORDER BY sop_instance_uid, destination").fetchall()
    assert [tuple(r) for r in rows] == [
        ("1.2.9.1", "pacs", "pending", f"outputs/{STUDY}/sc-1.2.9.1.dcm"),
        ("1.2.9.1", "web", "pending", f"outputs/{STUDY}/sc-1.2.9.1.dcm"),
        ("1.2.9.2", "pacs", "pending", f"outputs/{STUDY}/sr-1.2.9.2.dcm"),
        ("1.2.9.2", "web", "pending", f"outputs/{STUDY}/sr-1.2.9.2.dcm")]
    assert one(conn, "SELECT state, attempts, outputs FROM jobs") == ("done", 1, 2)
    assert worker.run_once() is None


def test_failing_job_is_retried_then_failed_with_reason(tmp_path: Path) -> None:
    spool, conn = setup(tmp_path)
    processor = Recorder([], SeriesGeometryError("duplicate slice positions"))
    worker = Worker(conn, spool, processor, destinations=["pacs"], max_attempts=2)
    first = worker.run_once()
    assert first is not None and first.state == "queued"
    second = worker.run_once()
    assert second is not None and second.state == "failed"
    assert one(conn, "SELECT state, attempts, last_error FROM jobs") == \
        ("failed", 2, "duplicate slice positions")
    assert worker.run_once() is None


def test_unexpected_error_keeps_only_type_and_place(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    spool, conn = setup(tmp_path)
    processor = Recorder([], RuntimeError("Doe^Jane 19700101"))
    caplog.set_level(logging.DEBUG)
    Worker(conn, spool, processor, destinations=[], max_attempts=1).run_once()
    error = conn.execute("SELECT last_error FROM jobs").fetchone()[0]
    assert error.startswith("RuntimeError at test_worker.py:")
    assert "job 1 failed: RuntimeError at test_worker.py:" in caplog.text
    assert "Doe^Jane" not in caplog.text and "19700101" not in caplog.text


def test_interrupted_job_is_requeued_or_failed_when_out_of_attempts(tmp_path: Path) -> None:
    _, conn = setup(tmp_path)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 1")
    assert requeue_interrupted(conn, 3, 300.0) == 1
    assert one(conn, "SELECT state FROM jobs") == ("queued",)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 3")
    assert requeue_interrupted(conn, 3, 300.0) == 0
    assert one(conn, "SELECT state FROM jobs") == ("failed",)


def test_a_stop_of_the_service_gives_the_attempt_back(tmp_path: Path) -> None:
    _, conn = setup(tmp_path)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 3")
    assert requeue_interrupted(conn, 3, 300.0, by_shutdown=True) == 1
    assert one(conn, "SELECT state, attempts FROM jobs") == ("queued", 2)


def test_job_of_a_reopened_study_is_superseded_and_not_exported(tmp_path: Path) -> None:
    spool, conn = setup(tmp_path)

    def reopen_while_running(paths: Sequence[Path]) -> ProcessedStudy:
        with db.transaction(conn):
            record_arrival(conn, STUDY, 250.0, new_instance=True)
        return ProcessedStudy([result("1.2.9.3", SecondaryCaptureImageStorage)])

    report = Worker(conn, spool, reopen_while_running, destinations=["pacs"],
                    max_attempts=3).run_once()
    assert report is not None and report.state == "superseded"
    assert one(conn, "SELECT COUNT(*) FROM outbound") == (0,)


@pytest.mark.parametrize(("previous", "after"), [("dead", "pending"), ("delivered", "delivered")])
def test_rerun_revives_dead_letters_but_not_deliveries(tmp_path: Path, previous: str,
                                                      after: str) -> None:
    spool, conn = setup(tmp_path)
    worker = Worker(conn, spool, Recorder([result("1.2.9.4", SecondaryCaptureImageStorage)]),
                    destinations=["pacs"], max_attempts=3)
    worker.run_once()
    conn.execute("UPDATE outbound SET state = ?, attempts = 6", (previous,))
    conn.execute("UPDATE jobs SET state = 'queued'")
    worker.run_once()
    assert one(conn, "SELECT state FROM outbound") == (after,)
