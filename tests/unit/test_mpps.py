"""MPPS SCP end to end: a pynetdicom SCU sends N-CREATE / N-SET to the real listener (port 0);
the step's state in the index, the failure statuses, and study completion by the step."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from test_scp import ct
from test_spool import STUDY

from dicom_ai.config import Settings
from dicom_ai.service import db
from dicom_ai.service.mpps import (
    MPPS_SOP_CLASS,
    N_CREATE_RQ,
    DataSetBuffer,
    MppsHandler,
    NormalizedRequest,
)
from dicom_ai.service.requestor import associate
from dicom_ai.service.scp import Listener, start_scp, supported_contexts
from dicom_ai.service.spool import Spool
from dicom_ai.service.studies import (
    RULE_MPPS,
    RULE_MPPS_DISCONTINUED,
    RULE_QUIET,
    CompletionRules,
    complete_due_studies,
    inspect_new_instances,
)

SERIES = "1.2.826.0.1.3680043.8.498.10.1"
STEP = "1.2.826.0.1.3680043.8.498.77.1"
RULES = CompletionRules(quiet_period_s=30.0, single_image_quiet_period_s=2.0,
                        maximum_wait_s=600.0)
#: Identity a modality sends in every step: it must never reach a log line or the index.
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-4711"


@dataclass
class Running:
    server: Listener
    spool: Spool
    port: int


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 1
    spool = Spool(tmp_path / "spool")
    server = start_scp(settings, spool)
    yield Running(server, spool, int(server.server_address[1]))
    server.stop()
    spool.close()


#: Command sets of the responses the SCU received in the current test.
RESPONSES: list[Dataset] = []


def _received(event: evt.Event) -> None:
    RESPONSES.append(event.message.command_set)


@pytest.fixture
def assoc(running: Running) -> Iterator[Association]:
    RESPONSES.clear()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MPPS_SOP_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = associate(ae, "127.0.0.1", running.port, ae_title="DICOMAI",
                            evt_handlers=[(evt.EVT_DIMSE_RECV, _received)])
    assert association.is_established
    yield association
    association.release()


def affected_instance() -> str:
    """Affected SOP Instance UID of the last response received."""
    return str(RESPONSES[-1].AffectedSOPInstanceUID)


def create_attributes(*, study: str | None = STUDY, status: str | None = "IN PROGRESS"
                      ) -> Dataset:
    """An N-CREATE Attribute List as a modality sends it (PS3.4 Table F.7.2-1, abridged)."""
    ds = Dataset()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CT"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedProcedureStepStartDate = "20261202"
    ds.PerformedProcedureStepStartTime = "063000"
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    if study is not None:
        item = Dataset()
        item.StudyInstanceUID = study
        item.AccessionNumber = "ACC1"
        ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedSeriesSequence = []
    return ds


def set_attributes(status: str, instances: list[str], *, series: str = SERIES) -> Dataset:
    """An N-SET Modification List ending the step and listing what it produced."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261202"
    ds.PerformedProcedureStepEndTime = "064500"
    item = Dataset()
    item.SeriesInstanceUID = series
    item.PerformingPhysicianName = "Who^Ever"
    refs = []
    for uid in instances:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    item.ReferencedImageSequence = refs
    item.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds.PerformedSeriesSequence = [item]
    return ds


def status_of(assoc: Association, request: str, ds: Dataset, uid: str | None = STEP) -> Dataset:
    if request == "create":
        rsp, _ = assoc.send_n_create(ds, MPPS_SOP_CLASS, uid)
    else:
        assert uid is not None
        rsp, _ = assoc.send_n_set(ds, MPPS_SOP_CLASS, uid)
    assert rsp is not None
    return rsp


def index(running: Running) -> sqlite3.Connection:
    return db.connect(running.spool.db_path)


def step_row(running: Running) -> tuple[str, ...] | None:
    conn = index(running)
    try:
        row = conn.execute("SELECT status, calling_aet FROM mpps WHERE sop_instance_uid = ?",
                           (STEP,)).fetchone()
        return None if row is None else tuple(row)
    finally:
        conn.close()


def tick(running: Running, now: float) -> list[tuple[str, str]]:
    conn = index(running)
    try:
        inspect_new_instances(conn, running.spool.root)
        return [(c.study_instance_uid, c.rule) for c in complete_due_studies(conn, now, RULES)]
    finally:
        conn.close()


def last_arrival(running: Running) -> float:
    conn = index(running)
    try:
        return float(conn.execute("SELECT MAX(last_received) FROM studies").fetchone()[0])
    finally:
        conn.close()


def test_the_mpps_context_is_offered_only_with_a_handler() -> None:
    assert MPPS_SOP_CLASS not in {str(cx.abstract_syntax) for cx in supported_contexts()}
    assert MPPS_SOP_CLASS in {str(cx.abstract_syntax) for cx in supported_contexts(mpps=True)}


def test_completed_step_completes_the_study_when_its_instances_arrived(
        running: Running, assoc: Association, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rsp = status_of(assoc, "create", create_attributes())
    assert (rsp.Status, affected_instance()) == (0x0000, STEP)
    assert step_row(running) == ("IN PROGRESS", "MODALITY")
    for sop in ("1.2.3.1", "1.2.3.2"):
        assert assoc.send_c_store(ct(sop)).Status == 0x0000
    # IN PROGRESS: the modality is still scanning, so no quiet period ends the study.
    assert tick(running, last_arrival(running) + 60.0) == []
    rsp = status_of(assoc, "set", set_attributes("COMPLETED", ["1.2.3.1", "1.2.3.2", "1.2.3.3"]))
    assert (rsp.Status, affected_instance()) == (0x0000, STEP)
    assert step_row(running) == ("COMPLETED", "MODALITY")
    assert tick(running, last_arrival(running) + 0.1) == []          # 1.2.3.3 is missing
    assert assoc.send_c_store(ct("1.2.3.3")).Status == 0x0000
    assert tick(running, last_arrival(running)) == [(STUDY, RULE_MPPS)]
    # What the index keeps of the step: status, UIDs, the caller, no identity.
    conn = index(running)
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert PATIENT_NAME not in dump and PATIENT_ID not in dump and "ACC1" not in dump
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


def test_a_step_completes_a_study_once(running: Running, assoc: Association) -> None:
    assert status_of(assoc, "create", create_attributes()).Status == 0x0000
    assert assoc.send_c_store(ct("1.2.3.1")).Status == 0x0000
    assert status_of(assoc, "set", set_attributes("COMPLETED", ["1.2.3.1"])).Status == 0x0000
    assert tick(running, last_arrival(running)) == [(STUDY, RULE_MPPS)]
    # A late instance re-opens the study; the consumed step does not complete it again at once.
    assert assoc.send_c_store(ct("1.2.3.9")).Status == 0x0000
    assert tick(running, last_arrival(running) + 1.0) == []
    assert tick(running, last_arrival(running) + 30.0) == [(STUDY, RULE_QUIET)]


def test_discontinued_step_processes_what_arrived(running: Running,
                                                   assoc: Association) -> None:
    assert status_of(assoc, "create", create_attributes()).Status == 0x0000
    assert assoc.send_c_store(ct("1.2.3.1")).Status == 0x0000
    rsp = status_of(assoc, "set", set_attributes("DISCONTINUED", ["1.2.3.1", "1.2.3.2"]))
    assert rsp.Status == 0x0000
    assert tick(running, last_arrival(running)) == [(STUDY, RULE_MPPS_DISCONTINUED)]


def test_a_completed_step_whose_instances_do_not_all_come_leaves_the_quiet_period(
        running: Running, assoc: Association) -> None:
    # A routing rule that forwards us one series of the exam: the step's list is never met.
    assert status_of(assoc, "create", create_attributes()).Status == 0x0000
    assert assoc.send_c_store(ct("1.2.3.1")).Status == 0x0000
    assert status_of(assoc, "set", set_attributes("COMPLETED", ["1.2.3.1", "1.2.9.9"])
                     ).Status == 0x0000
    assert tick(running, last_arrival(running) + 29.0) == []
    assert tick(running, last_arrival(running) + 30.0) == [(STUDY, RULE_QUIET)]


def test_in_progress_n_set_keeps_the_step_open(running: Running, assoc: Association) -> None:
    assert status_of(assoc, "create", create_attributes()).Status == 0x0000
    assert status_of(assoc, "set", set_attributes("IN PROGRESS", ["1.2.3.1"])).Status == 0x0000
    assert status_of(assoc, "set", set_attributes("COMPLETED", ["1.2.3.1"])).Status == 0x0000
    assert step_row(running) == ("COMPLETED", "MODALITY")


def test_the_scp_assigns_a_uid_when_the_scu_gives_none(running: Running,
                                                       assoc: Association) -> None:
    rsp = status_of(assoc, "create", create_attributes(), uid=None)
    assert rsp.Status == 0x0000
    assigned = affected_instance()
    assert assigned.startswith("2.25.")
    assert status_of(assoc, "set", set_attributes("COMPLETED", []), uid=assigned
                     ).Status == 0x0000


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(("attributes", "status"), [
    ({"status": "COMPLETED"}, 0x0106),      # a new step is IN PROGRESS
    ({"status": "FINISHED"}, 0x0106),       # not a defined term
    ({"status": None}, 0x0120),
    ({"study": None}, 0x0120),
    ({"study": "1.2.03.4"}, 0x0106),        # leading zero: not a UID
])
def test_n_create_refusals(running: Running, assoc: Association,
                           attributes: dict[str, str | None], status: int) -> None:
    assert status_of(assoc, "create", create_attributes(**attributes)).Status == status
    assert step_row(running) is None


def test_duplicate_n_create_is_refused(running: Running, assoc: Association) -> None:
    assert status_of(assoc, "create", create_attributes()).Status == 0x0000
    assert status_of(assoc, "create", create_attributes(study=STUDY + ".5")).Status == 0x0111
    conn = index(running)
    studies = [r[0] for r in conn.execute("SELECT study_instance_uid FROM mpps_studies")]
    conn.close()
    assert studies == [STUDY]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_n_set_refusals(running: Running, assoc: Association) -> None:
    assert status_of(assoc, "set", set_attributes("COMPLETED", [])).Status == 0x0112
    assert status_of(assoc, "create", create_attributes()).Status == 0x0000
    bad_status = set_attributes("COMPLETED", [])
    bad_status.PerformedProcedureStepStatus = "DONE"
    assert status_of(assoc, "set", bad_status).Status == 0x0106
    assert status_of(assoc, "set", set_attributes("COMPLETED", ["1.2.3.x"])).Status == 0x0106
    assert status_of(assoc, "set", set_attributes("COMPLETED", [], series="")).Status == 0x0106
    assert step_row(running) == ("IN PROGRESS", "MODALITY")           # nothing of them kept
    assert status_of(assoc, "set", set_attributes("COMPLETED", ["1.2.3.1"])).Status == 0x0000
    again = status_of(assoc, "set", set_attributes("DISCONTINUED", []))
    # PS3.4 F.7.2.2.2: Processing failure, Error ID A710 "may no longer be updated".
    assert (again.Status, again.ErrorID) == (0x0110, 0xA710)
    assert step_row(running) == ("COMPLETED", "MODALITY")


def test_handler_refuses_what_the_listener_cannot_check(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    handler = MppsHandler(spool.db_path, clock=lambda: 100.0)
    request = NormalizedRequest("MODALITY", N_CREATE_RQ, MPPS_SOP_CLASS, STEP,
                                ExplicitVRLittleEndian)
    assert handler(request, None).status == 0x0120                    # no data set
    big = DataSetBuffer(limit=8)
    big.add(memoryview(b"\0" * 16))
    assert handler(request, big).status == 0x0213
    garbage = DataSetBuffer()
    # A Scheduled Step Attribute Sequence whose item claims more bytes than follow.
    garbage.add(memoryview(b"\x40\x00\x70\x02SQ\x00\x00\xff\xff\xff\xff"
                           b"\xfe\xff\x00\xe0\x10\x00\x00\x00garbage"))
    assert handler(request, garbage).status == 0x0110
    other = NormalizedRequest("MODALITY", N_CREATE_RQ, CTImageStorage, STEP,
                              ExplicitVRLittleEndian)
    assert handler(other, DataSetBuffer()).status == 0x0122
    bad_uid = NormalizedRequest("MODALITY", N_CREATE_RQ, MPPS_SOP_CLASS, "1.2.x",
                                ExplicitVRLittleEndian)
    result = handler(bad_uid, DataSetBuffer())
    assert (result.status, result.sop_instance_uid) == (0x0117, "")
    spool.close()
