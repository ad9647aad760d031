"""Audit trail: whole lines from several processes at once, order, no identity, UIDs checked
before they name a file, a failing write never raises — and the chain of one study through a
real listener, assembler, worker (tiny real bundle) and exporter to a second listener."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from test_spool import encoded

from dicom_ai.config import DestinationSettings, Settings
from dicom_ai.dicom.uid import InvalidUIDError
from dicom_ai.service import audit, db
from dicom_ai.service.association import StoreRequest
from dicom_ai.service.export import Exporter, make_senders
from dicom_ai.service.requestor import associate
from dicom_ai.service.scp import StoreHandler, start_scp
from dicom_ai.service.spool import InstanceKeys, Spool, parse_keys
from dicom_ai.service.status import show_trail
from dicom_ai.service.studies import Assembler, CompletionRules
from dicom_ai.service.worker import Worker, pipeline_processor
from tests.bundles import write_bundle

STUDY = "1.2.826.0.1.3680043.8.498.77"
REPO = Path(__file__).resolve().parents[2]
SAMPLE_CXR = REPO / "sample_studies" / "cxr01" / "1.dcm"
SECRETS = ("Auditname^Patient", "PID-AUDIT-4711", "19020304")

WRITERS = 4
LINES_PER_WRITER = 300
#: Larger than PIPE_BUF (4096): whole lines must not depend on the pipe atomicity limit.
PADDING = 6000


def _writer(root: str, writer: int, start: multiprocessing.synchronize.Event) -> None:
    start.wait(10.0)
    for i in range(LINES_PER_WRITER):
        if not audit.record(Path(root), STUDY, "sent", destination=f"w{writer}" + "x" * PADDING,
                            sop_instance_uid=f"1.2.3.{writer}.{i}", attempt=i):
            os._exit(3)
    os._exit(0)


def test_processes_appending_at_once_write_whole_lines_in_each_ones_order(
        tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60.0)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    raw = audit.audit_path(tmp_path, STUDY).read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b""
    assert len(lines) - 1 == WRITERS * LINES_PER_WRITER
    events = [json.loads(line) for line in lines[:-1]]  # every line is whole JSON
    assert events == audit.read_events(tmp_path, STUDY)
    for w in range(WRITERS):
        mine = [e for e in events if e["destination"].startswith(f"w{w}x")]
        assert [e["attempt"] for e in mine] == list(range(LINES_PER_WRITER))
        assert len({e["pid"] for e in mine}) == 1


def test_events_come_back_in_the_order_written_with_their_fields(tmp_path: Path) -> None:
    keys = InstanceKeys(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", "1.2.840.10008.5.1.4.1.1.2", "ACME")
    assert audit.received(tmp_path, keys, calling_aet="CT1", transfer_syntax="1.2.840.10008.1.2.1")
    assert audit.record(tmp_path, STUDY, "complete", now=1e9, generation=1, instance_count=1,
                        rule="quiet_period", quiet_period_s=30.0)
    assert audit.record(tmp_path, STUDY, "failed", job_id=7, attempt=1, reason="no series",
                        final=False)
    events = audit.read_events(tmp_path, STUDY)
    assert [e["event"] for e in events] == ["received", "complete", "failed"]
    assert events[0] | {"time": "", "pid": 0} == {
        "time": "", "event": "received", "study_instance_uid": STUDY, "pid": 0,
        "sop_instance_uid": f"{STUDY}.1.1", "series_instance_uid": f"{STUDY}.1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "calling_aet": "CT1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "new": True}
    assert events[1]["time"] == "2001-09-09T01:46:40.000000Z"
    assert events[0]["pid"] == os.getpid()


@pytest.mark.parametrize("fields", [
    {"patient_name": "Doe^Jane"},                                # a field naming identity
    {"models": [{"name": "m", "patient_id": "PID-1"}]},          # nested too
    {"sop_instance_uid": "Doe^Jane"},                            # text in a UID field
    {"results": [{"sop_instance_uid": "19700101 Jane"}]},
    {"time": "2000-01-01"},                                      # a reserved key
    {"reason": object()},                                        # not JSON
])
def test_fields_that_could_carry_identity_are_refused_without_naming_the_value(
        tmp_path: Path, fields: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="dicom_ai"):
        assert audit.record(tmp_path, STUDY, "sent", **fields) is False
    assert not audit.audit_path(tmp_path, STUDY).exists()
    assert "audit event sent not written" in caplog.text
    assert "Doe" not in caplog.text and "PID-1" not in caplog.text
    assert "1970" not in caplog.text


def test_a_reason_quoting_a_value_is_redacted(tmp_path: Path) -> None:
    assert audit.record(tmp_path, STUDY, "send_failed", destination="pacs",
                        sop_instance_uid="1.2.3", attempt=1,
                        reason="C-STORE status 0xA900 (Patient ID 'PID-AUDIT-4711' differs)")
    (event,) = audit.read_events(tmp_path, STUDY)
    assert event["reason"] == "C-STORE status 0xA900 (Patient ID '…' differs)"


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/../3", "Doe^Jane", "", "1.02.3",
                                 "1." * 40 + "1"])
def test_a_study_uid_that_is_not_a_uid_names_no_file(tmp_path: Path, uid: str) -> None:
    assert audit.record(tmp_path, uid, "received") is False
    with pytest.raises(InvalidUIDError):
        audit.audit_path(tmp_path, uid)
    with pytest.raises(InvalidUIDError):
        audit.read_events(tmp_path, uid)
    assert list(tmp_path.rglob("*")) == []


def test_unknown_event_is_refused(tmp_path: Path) -> None:
    assert audit.record(tmp_path, STUDY, "teleported") is False
    assert not audit.audit_path(tmp_path, STUDY).exists()


def test_an_instance_indexed_by_the_start_up_scan_is_in_the_trail(tmp_path: Path) -> None:
    orphan = encoded("1.2.3.9", study=STUDY)
    spool = Spool(tmp_path)
    # A crash after the rename and before the insert leaves a whole, unindexed file.
    spool.instance_path(parse_keys(orphan)).parent.mkdir(parents=True)
    spool.instance_path(parse_keys(orphan)).write_bytes(orphan)
    assert spool.reindex() == 1
    spool.close()
    (event,) = audit.read_events(tmp_path, STUDY)
    assert (event["event"], event["sop_instance_uid"], event["calling_aet"],
            event["transfer_syntax_uid"]) == ("received", "1.2.3.9", "", None)
    out = io.StringIO()
    assert show_trail(tmp_path, STUDY, out=out) == 0
    assert "1.2.3.9 of series" in out.getvalue()
    assert "from (start-up scan) (CT Image Storage)" in out.getvalue()


def test_a_failing_write_is_logged_and_never_raises(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / audit.AUDIT_DIR).write_text("a file where the directory should be")
    keys = InstanceKeys(STUDY, "1.2.1", "1.2.1.1", "1.2.840.10008.5.1.4.1.1.2", "")
    with caplog.at_level(logging.ERROR, logger="dicom_ai"):
        assert audit.record(tmp_path, STUDY, "complete", generation=1) is False
        assert audit.received(tmp_path, keys, calling_aet="CT", transfer_syntax="1.2") is False
        assert audit.analysed(tmp_path, STUDY, job_id=1, generation=1, datasets=[object()],
                              findings=None) is False
    assert caplog.text.count("not written") == 3
    assert "NotADirectoryError" in caplog.text


def test_a_store_succeeds_when_its_audit_line_cannot_be_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path)
    (tmp_path / audit.AUDIT_DIR).write_text("a file where the directory should be")
    data = encoded("1.2.3.101", study=STUDY)
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    dataset = memoryview(data)[132 + 12 + meta.FileMetaInformationGroupLength:]
    handler = StoreHandler(spool, minimum_free_mb=0, own_manufacturer="dicom-ai")
    incoming = handler(StoreRequest("CT1", CTImageStorage, "1.2.3.101", meta.TransferSyntaxUID))
    incoming.add(dataset)
    with caplog.at_level(logging.ERROR, logger="dicom_ai"):
        assert incoming.finish().status == 0x0000
    assert "audit event received not written" in caplog.text
    assert spool.instance_path(parse_keys(data)).is_file()
    spool.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    assert audit.record(tmp_path, STUDY, "complete", generation=1)
    with audit.audit_path(tmp_path, STUDY).open("ab") as fh:
        fh.write(b'{"time": "2026-12-02T00:00:00Z", "event": "sen')
    assert [e["event"] for e in audit.read_events(tmp_path, STUDY)] == ["complete"]


def test_unknown_study_raises_and_status_says_so(tmp_path: Path) -> None:
    with pytest.raises(audit.UnknownStudyError):
        audit.read_events(tmp_path, STUDY)
    out, err = io.StringIO(), io.StringIO()
    assert show_trail(tmp_path, STUDY, out=out, err=err) == 1
    assert f"no audit trail for study {STUDY}" in err.getvalue() and out.getvalue() == ""
    assert show_trail(tmp_path, "Doe^Jane", out=out, err=err) == 2
    assert "Doe" not in err.getvalue()


def test_findings_summary_names_each_model_version_and_its_positive_labels() -> None:
    document = {"results": [
        {"series_instance_uid": "1.2.3", "model": {"name": "cxr", "version": "1.4.0"},
         "status": "done", "findings": [{"label": "pneumonia", "probability": 0.9,
                                         "positive": True},
                                        {"label": "effusion", "positive": False}]},
        {"series_instance_uid": "1.2.4", "model": {"name": "cxr", "version": "1.4.0"},
         "status": "rejected", "reason": "lateral view", "findings": []}]}
    assert audit.findings_summary(document) == [
        {"name": "cxr", "version": "1.4.0", "series_instance_uid": "1.2.3", "status": "done",
         "findings": 2, "positive": ["pneumonia"]},
        {"name": "cxr", "version": "1.4.0", "series_instance_uid": "1.2.4", "status": "rejected",
         "findings": 0, "positive": [], "reason": "lateral view"}]
    assert audit.findings_summary(None) == []


def _wait_for(root: Path, study: str, event: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if any(e["event"] == event for e in audit.read_events(root, study)):
                return
        except audit.UnknownStudyError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no {event} event within {timeout_s} s")


@pytest.mark.slow
def test_one_study_through_listener_assembler_worker_and_exporter(tmp_path: Path) -> None:
    if not SAMPLE_CXR.exists():
        pytest.skip("sample_studies not built")
    write_bundle(tmp_path / "models")
    pacs_settings = Settings()
    pacs_settings.scp.ae_title, pacs_settings.scp.port = "PACS", 0
    pacs_settings.storage.minimum_free_mb = 1
    # Not our manufacturer: the PACS keeps what we send instead of dropping our own results.
    pacs_settings.output.manufacturer = "pacs"
    pacs_spool = Spool(tmp_path / "pacs")
    pacs = start_scp(pacs_settings, pacs_spool)

    settings = Settings()
    settings.scp.port = 0
    settings.storage.directory = str(tmp_path / "spool")
    settings.storage.minimum_free_mb = 1
    settings.inference.models_dir = str(tmp_path / "models")
    settings.inference.device = "cpu"
    settings.export.destinations = [DestinationSettings(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=int(pacs.server_address[1]))]
    root = Path(settings.storage.directory)
    spool = Spool(root)
    listener = start_scp(settings, spool)
    assembler = Assembler(spool.db_path, CompletionRules.uniform(0.2))
    assembler.start()
    conn = db.connect(spool.db_path)
    try:
        ds = pydicom.dcmread(SAMPLE_CXR)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRETS
        study = str(ds.StudyInstanceUID)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = associate(ae, "127.0.0.1", int(listener.server_address[1]), ae_title="DICOMAI")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        _wait_for(root, study, "job_queued")

        worker = Worker(conn, spool, pipeline_processor(settings), destinations=["pacs"],
                        max_attempts=1)
        report = worker.run_once()
        assert report is not None and report.state == "done"
        assert Exporter(conn, root, make_senders(settings), settings.export).run_once() > 0
    finally:
        conn.close()
        assembler.stop()
        assembler.join(5.0)
        listener.stop()
        pacs.stop()
        spool.close()
        pacs_spool.close()

    events = audit.read_events(root, study)
    kinds = [e["event"] for e in events]
    results = [r["sop_instance_uid"] for r in events[kinds.index("analysed")]["results"]]
    assert results
    assert kinds == ["received", "complete", "job_queued", "job_started", "analysed",
                     *["sent"] * len(results), *["acknowledged"] * len(results)]
    received, complete, queued, started, analysed = events[:5]
    assert received["sop_instance_uid"] == str(ds.SOPInstanceUID)
    assert received["calling_aet"] == "MODALITY"
    assert received["transfer_syntax_uid"] == str(ds.file_meta.TransferSyntaxUID)
    assert complete["instance_count"] == 1 and complete["generation"] == 1
    assert queued["job_id"] == started["job_id"] == analysed["job_id"] == report.job.id
    assert [(m["name"], m["version"]) for m in analysed["models"]] == [("tiny-cxr", "0.0.1")]
    acknowledged = events[-len(results):]
    assert sorted(e["sop_instance_uid"] for e in acknowledged) == sorted(results)
    assert {(e["destination"], e["status"]) for e in acknowledged} == {("pacs", "stored")}
    # Delivered for real: every result is in the PACS's spool.
    pacs_files = {p.stem for p in (tmp_path / "pacs" / "incoming").rglob("*.dcm")}
    assert set(results) <= pacs_files

    text = audit.audit_path(root, study).read_text()
    for secret in SECRETS:
        assert secret not in text

    out, err = io.StringIO(), io.StringIO()
    assert show_trail(root, study, out=out, err=err) == 0
    shown = out.getvalue()
    assert f"Study {study}: {len(events)} audit events" in shown
    assert "received" in shown and "from MODALITY" in shown
    assert "model tiny-cxr 0.0.1" in shown
    assert f"{results[0]} by pacs: stored" in shown
    for secret in SECRETS:
        assert secret not in shown
    out = io.StringIO()
    assert show_trail(root, study, as_json=True, out=out, err=err) == 0
    assert [json.loads(line) for line in out.getvalue().splitlines()] == events
