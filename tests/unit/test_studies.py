"""Study assembly: each completion rule, re-opening, supersession, forced completion, queueing."""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from test_spool import encoded

from dicom_ai.config import Settings, load_settings, validate
from dicom_ai.service import audit, db, studies
from dicom_ai.service.scp import start_scp
from dicom_ai.service.spool import Spool, parse_dataset_keys, parse_keys
from dicom_ai.service.studies import (
    FACTS_PREFIX,
    KEY_OBJECT_SELECTION,
    LONG,
    NEUTRAL,
    RULE_INSTANCE_COUNT,
    RULE_MANIFEST,
    RULE_MAXIMUM_WAIT,
    RULE_QUIET,
    RULE_QUIET_SERIES_COMPLETE,
    RULE_QUIET_SINGLE_IMAGE,
    SINGLE,
    Assembler,
    CompletionRules,
    InstanceFacts,
    _complete,
    classify,
    complete_due_studies,
    complete_quiet_studies,
    inspect_new_instances,
    queue_unprocessed,
    read_facts,
    read_manifest,
    record_arrival,
)

STUDY = "1.2.826.0.1.3680043.8.498.20"


def arrive(conn: sqlite3.Connection, now: float, *, new: bool = True) -> None:
    with db.transaction(conn):
        record_arrival(conn, STUDY, now, new_instance=new)


def study_row(conn: sqlite3.Connection) -> tuple[str, int, int]:
    row = conn.execute("SELECT state, generation, instance_count FROM studies").fetchone()
    return str(row[0]), int(row[1]), int(row[2])


def jobs(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(int(r[0]), str(r[1])) for r in
            conn.execute("SELECT generation, state FROM jobs ORDER BY id")]


def test_complete_after_quiet_period(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    arrive(conn, 110.0)
    # Quiet period 30 s from the last instance (t = 110): not complete at 139.9, complete at 140.
    assert complete_quiet_studies(conn, 139.9, 30.0) == []
    assert complete_quiet_studies(conn, 140.0, 30.0) == [(STUDY, 1)]
    assert study_row(conn) == ("complete", 1, 2)
    assert jobs(conn) == [(1, "queued")]
    assert complete_quiet_studies(conn, 500.0, 30.0) == []


def test_new_instance_reopens_and_supersedes_queued_job(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    arrive(conn, 135.0)
    assert study_row(conn) == ("receiving", 2, 2)
    assert jobs(conn) == [(1, "superseded")]
    assert complete_quiet_studies(conn, 165.0, 30.0) == [(STUDY, 2)]
    assert jobs(conn) == [(1, "superseded"), (2, "queued")]


def test_resent_instance_does_not_reopen(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    arrive(conn, 140.0, new=False)
    assert study_row(conn) == ("complete", 1, 1)
    assert jobs(conn) == [(1, "queued")]


def test_running_job_is_not_superseded_by_reopening(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    conn.execute("UPDATE jobs SET state = 'running'")
    arrive(conn, 131.0)
    # The worker decides when the running job ends (see test_worker); the queue is not touched.
    assert jobs(conn) == [(1, "running")]


def test_queue_unprocessed_fills_the_gap_left_by_a_crash(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    conn.execute("DELETE FROM jobs")
    assert queue_unprocessed(conn, 200.0) == 1
    assert jobs(conn) == [(1, "queued")]
    assert queue_unprocessed(conn, 201.0) == 0


# --- completion per rule -------------------------------------------------------------------

RULES = CompletionRules(quiet_period_s=30.0, single_image_quiet_period_s=2.0,
                        maximum_wait_s=600.0)
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
OP8, DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.5.1", "1.2.840.10008.5.1.4.1.1.77.1.7"
SC, COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33"
S1, S2 = STUDY + ".1", STUDY + ".2"


def store(spool: Spool, sop: str, now: float, *, series: str = S1, study: str = STUDY,
          **attrs: object) -> None:
    data = encoded(sop, study=study, series=series, **attrs)
    spool.store([data], parse_keys(data), calling_aet="MOD", now=now)


def manifest(sop: str, listed: dict[str, list[str]], *, title: str = "113030",
             study: str = STUDY) -> bytes:
    """A Key Object Selection whose evidence lists ``listed`` (series → instances)."""
    ds = Dataset()
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".99"
    ds.Modality = "KO"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = title, "DCM", "Manifest"
    ds.ConceptNameCodeSequence = [code]
    evidence = Dataset()
    evidence.StudyInstanceUID = study
    series_items = []
    for series, sops in listed.items():
        item = Dataset()
        item.SeriesInstanceUID = series
        refs = []
        for uid in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID = CTImageStorage
            ref.ReferencedSOPInstanceUID = uid
            refs.append(ref)
        item.ReferencedSOPSequence = refs
        series_items.append(item)
    evidence.ReferencedSeriesSequence = series_items
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def store_manifest(spool: Spool, sop: str, listed: dict[str, list[str]], now: float,
                   **kwargs: str) -> None:
    data = manifest(sop, listed, **kwargs)
    spool.store([data], parse_keys(data), calling_aet="PACS", now=now)


def due(spool: Spool, conn: sqlite3.Connection, now: float,
        rules: CompletionRules = RULES) -> list[tuple[str, int, str]]:
    """One assembler tick at ``now``: (study, generation, rule) of each completion."""
    inspect_new_instances(conn, spool.root)
    return [(c.study_instance_uid, c.generation, c.rule)
            for c in complete_due_studies(conn, now, rules)]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


@pytest.fixture
def conn(spool: Spool) -> Iterator[sqlite3.Connection]:
    conn = db.connect(spool.db_path)
    yield conn
    conn.close()


@pytest.mark.parametrize(("sop_class", "modality", "frames", "kind"), [
    (CR, "CR", None, SINGLE),
    (DX, "DX", None, SINGLE),
    (OP8, "OP", None, SINGLE),
    (OP8, "OP", 12, LONG),               # a multi-frame ophthalmic series waits like a CT
    (DERMOSCOPY, "DMS", None, SINGLE),
    (SC, "OP", None, SINGLE),            # a fundus photograph sent as Secondary Capture
    (SC, "XC", 1, SINGLE),
    (SC, "OT", None, LONG),              # a screen capture of anything
    (SC, "CT", None, LONG),              # a CT localizer
    (CTImageStorage, "CT", None, LONG),
    (KEY_OBJECT_SELECTION, "KO", None, NEUTRAL),
    (COMPREHENSIVE_SR, "SR", None, NEUTRAL),
])
def test_classify(sop_class: str, modality: str, frames: int | None, kind: str) -> None:
    assert classify(sop_class, modality, frames) == kind


def test_single_image_study_completes_after_the_short_quiet_period(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, SOPClassUID=CR, Modality="CR")
    store(spool, "1.2.3.2", 100.5, SOPClassUID=CR, Modality="CR")
    assert due(spool, conn, 102.4) == []
    assert due(spool, conn, 102.5) == [(STUDY, 1, RULE_QUIET_SINGLE_IMAGE)]
    assert conn.execute("SELECT completed_rule FROM studies").fetchone()[0] == "quiet-single-image"
    assert jobs(conn) == [(1, "queued")]


def test_an_sr_beside_the_images_does_not_lengthen_the_wait(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, SOPClassUID=DX, Modality="DX")
    store(spool, "1.2.3.2", 100.0, series=S2, SOPClassUID=COMPREHENSIVE_SR, Modality="SR")
    assert due(spool, conn, 102.0) == [(STUDY, 1, RULE_QUIET_SINGLE_IMAGE)]


def test_ct_and_mixed_studies_wait_the_long_quiet_period(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0)                                       # CT
    store(spool, "1.2.4.1", 100.0, study=STUDY + ".7", series=STUDY + ".7.1", SOPClassUID=CR,
          Modality="CR")
    store(spool, "1.2.4.2", 100.0, study=STUDY + ".7", series=STUDY + ".7.2")  # and a CT
    store(spool, "1.2.5.1", 100.0, study=STUDY + ".8", series=STUDY + ".8.1",
          SOPClassUID=KEY_OBJECT_SELECTION, Modality="KO")               # a lone non-image
    assert due(spool, conn, 129.9) == []
    assert sorted(due(spool, conn, 130.0)) == [(STUDY, 1, RULE_QUIET),
                                               (STUDY + ".7", 1, RULE_QUIET),
                                               (STUDY + ".8", 1, RULE_QUIET)]


def test_uniform_rules_keep_one_quiet_period(spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, SOPClassUID=CR, Modality="CR")
    assert complete_quiet_studies(conn, 129.0, 30.0) == []
    assert complete_quiet_studies(conn, 130.0, 30.0) == [(STUDY, 1)]


def test_study_related_instances_complete_at_the_last_one(
        spool: Spool, conn: sqlite3.Connection) -> None:
    for i in range(3):
        store(spool, f"1.2.3.{i + 1}", 100.0 + i, NumberOfStudyRelatedInstances=3)
        # Complete the moment the third arrives, 30 s before the quiet period would end.
        assert due(spool, conn, 100.0 + i) == ([(STUDY, 1, RULE_INSTANCE_COUNT)] if i == 2
                                               else [])


def test_a_consumed_count_does_not_complete_a_reopened_study_again(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, NumberOfStudyRelatedInstances=1)
    assert due(spool, conn, 100.0) == [(STUDY, 1, RULE_INSTANCE_COUNT)]
    store(spool, "1.2.3.2", 110.0)                     # re-opens; the count was already met
    assert due(spool, conn, 110.0) == []
    assert due(spool, conn, 140.0) == [(STUDY, 2, RULE_QUIET)]
    assert jobs(conn) == [(1, "superseded"), (2, "queued")]


def test_a_changed_count_is_a_new_expectation(spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, NumberOfStudyRelatedInstances=1)
    assert due(spool, conn, 100.0) == [(STUDY, 1, RULE_INSTANCE_COUNT)]
    store(spool, "1.2.3.2", 110.0, NumberOfStudyRelatedInstances=3)
    assert due(spool, conn, 110.0) == []
    store(spool, "1.2.3.3", 111.0, NumberOfStudyRelatedInstances=3)
    assert due(spool, conn, 111.0) == [(STUDY, 2, RULE_INSTANCE_COUNT)]


def test_series_counts_with_the_study_series_count_complete_the_study(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, NumberOfSeriesRelatedInstances=2,
          NumberOfStudyRelatedSeries=2)
    store(spool, "1.2.3.2", 101.0, NumberOfSeriesRelatedInstances=2,
          NumberOfStudyRelatedSeries=2)
    assert due(spool, conn, 101.0) == []               # one series of two is complete
    store(spool, "1.2.3.3", 102.0, series=S2, NumberOfSeriesRelatedInstances=1,
          NumberOfStudyRelatedSeries=2)
    assert due(spool, conn, 102.0) == [(STUDY, 1, RULE_INSTANCE_COUNT)]


def test_complete_series_shorten_the_quiet_period_of_a_ct(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, NumberOfSeriesRelatedInstances=2)
    assert due(spool, conn, 105.0) == []               # its series still lacks an instance
    store(spool, "1.2.3.2", 106.0, NumberOfSeriesRelatedInstances=2)
    assert due(spool, conn, 107.9) == []
    assert due(spool, conn, 108.0) == [(STUDY, 1, RULE_QUIET_SERIES_COMPLETE)]


def test_a_series_without_a_count_keeps_the_long_quiet_period(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, NumberOfSeriesRelatedInstances=1)
    store(spool, "1.2.3.2", 100.0, series=S2)
    assert due(spool, conn, 110.0) == []
    assert due(spool, conn, 130.0) == [(STUDY, 1, RULE_QUIET)]


def test_manifest_completes_when_every_listed_instance_arrived(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store_manifest(spool, "1.2.9.1", {S1: ["1.2.3.1", "1.2.3.2"], S2: ["1.2.3.3"]}, 100.0)
    store(spool, "1.2.3.1", 101.0)
    store(spool, "1.2.3.3", 102.0, series=S2)
    assert due(spool, conn, 103.0) == []
    store(spool, "1.2.3.2", 104.0)
    assert due(spool, conn, 104.0) == [(STUDY, 1, RULE_MANIFEST)]
    listed = conn.execute("SELECT COUNT(*) FROM expected_instances").fetchone()[0]
    assert listed == 3


def test_manifest_sent_after_the_images_completes_at_once(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0)
    assert due(spool, conn, 101.0) == []
    store_manifest(spool, "1.2.9.1", {S1: ["1.2.3.1"]}, 105.0)
    assert due(spool, conn, 105.0) == [(STUDY, 1, RULE_MANIFEST)]


def test_a_key_object_selection_that_is_no_manifest_lists_no_study(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0)
    store_manifest(spool, "1.2.9.1", {S1: ["1.2.3.1"]}, 101.0, title="113000")  # Of Interest
    assert due(spool, conn, 101.0) == []
    assert conn.execute("SELECT COUNT(*) FROM study_expectations").fetchone()[0] == 0
    assert due(spool, conn, 131.0) == [(STUDY, 1, RULE_QUIET)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_read_manifest_refuses_malformed_uids(tmp_path: Path) -> None:
    path = tmp_path / "kos.dcm"
    path.write_bytes(manifest("1.2.9.1", {S1: ["1.2.03.1"]}))
    assert read_manifest(path) is None
    path.write_bytes(manifest("1.2.9.1", {S1: ["1.2.3.1"]}))
    assert read_manifest(path) == {STUDY: {"1.2.3.1"}}
    path.write_bytes(b"\0" * 200)
    assert read_manifest(path) is None


def test_maximum_wait_forces_completion_of_a_trickling_study(
        spool: Spool, conn: sqlite3.Connection) -> None:
    # An instance every 20 s never leaves 30 s of quiet; the maximum wait ends it 600 s after
    # the first one.
    completed: list[tuple[str, int, str]] = []
    for i in range(40):
        store(spool, f"1.2.3.{i + 1}", 100.0 + 20 * i)
        completed += due(spool, conn, 100.0 + 20 * i + 10)
        if completed:
            break
    assert completed == [(STUDY, 1, RULE_MAXIMUM_WAIT)]
    (completed_at,) = conn.execute("SELECT completed_at FROM studies").fetchone()
    assert completed_at == 100.0 + 600.0 + 10


def test_maximum_wait_of_a_reopened_study_counts_from_the_reopening(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0)
    assert due(spool, conn, 130.0) == [(STUDY, 1, RULE_QUIET)]
    for i in range(40):
        store(spool, f"1.2.4.{i + 1}", 1000.0 + 20 * i)
        if completions := due(spool, conn, 1000.0 + 20 * i + 10):
            assert completions == [(STUDY, 2, RULE_MAXIMUM_WAIT)]
            break
    assert tuple(conn.execute("SELECT opened_at, completed_at FROM studies").fetchone()) == (
        1000.0, 1610.0)


def test_an_arrival_between_evaluation_and_completion_keeps_the_study_open(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, SOPClassUID=CR, Modality="CR")
    inspect_new_instances(conn, spool.root)
    with db.transaction(conn):
        assert _complete(conn, STUDY, 1, 99.0, RULE_QUIET, 110.0, 10.0) is None
    assert study_row(conn)[0] == "receiving"


def dataset_of(part10: bytes) -> bytes:
    """The data set of a Part 10 file, as a C-STORE carries it (no preamble, no file meta)."""
    return part10[144 + struct.unpack_from("<L", part10, 140)[0]:]


def test_the_listener_records_the_facts_its_walk_read(
        spool: Spool, conn: sqlite3.Connection) -> None:
    data = encoded("1.2.3.1", study=STUDY, series=S1, SOPClassUID=CR, Modality="CR",
                   NumberOfStudyRelatedInstances=1)
    keys = parse_dataset_keys(dataset_of(data), ExplicitVRLittleEndian)
    assert keys.facts == InstanceFacts(SINGLE, study_related_instances=1)
    spool.store([data], keys, calling_aet="MOD", now=100.0)
    (rel,) = conn.execute("SELECT path FROM instances").fetchone()
    # Nothing is read back from the file: completion works from what the listener recorded.
    (spool.root / rel).unlink()
    assert inspect_new_instances(conn, spool.root) == 0
    assert due(spool, conn, 100.0) == [(STUDY, 1, RULE_INSTANCE_COUNT)]


def test_facts_the_listener_cannot_decide_are_left_to_the_assembler() -> None:
    cr = dataset_of(encoded("1.2.3.1", SOPClassUID=CR, Modality="CR"))
    ct = dataset_of(encoded("1.2.3.2"))
    # A prefix ending before Number of Frames (0028,0008) could be reached: a CR's kind depends
    # on it, a CT's does not.
    before = cr.index(b"MONOCHROME2") - 8
    assert parse_dataset_keys(cr[:before], ExplicitVRLittleEndian).facts is None
    assert parse_dataset_keys(ct[:ct.index(b"MONOCHROME2") - 8],
                              ExplicitVRLittleEndian).facts == InstanceFacts(LONG)
    # A prefix cut inside an element past the keys: the keys, from a walk that stops at them.
    keys = parse_dataset_keys(cr[:before + 11], ExplicitVRLittleEndian)
    assert (keys.sop_instance_uid, keys.facts) == ("1.2.3.1", None)
    # A manifest's list needs the whole object.
    kos = dataset_of(manifest("1.2.3.3", {S1: ["1.2.3.1"]}))
    assert parse_dataset_keys(kos, ExplicitVRLittleEndian).facts is None


def test_unreadable_instance_waits_the_long_quiet_period(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, SOPClassUID=CR, Modality="CR")
    (rel,) = conn.execute("SELECT path FROM instances").fetchone()
    (spool.root / rel).write_bytes(b"\0" * 10)
    assert due(spool, conn, 103.0) == []
    assert conn.execute("SELECT kind FROM instance_facts").fetchone()[0] == LONG
    assert due(spool, conn, 130.0) == [(STUDY, 1, RULE_QUIET)]


def test_purging_a_study_removes_what_completion_knew(
        spool: Spool, conn: sqlite3.Connection) -> None:
    store_manifest(spool, "1.2.9.1", {S1: ["1.2.3.1"]}, 100.0)
    store(spool, "1.2.3.1", 100.0, NumberOfStudyRelatedInstances=2)
    due(spool, conn, 100.0)
    with db.transaction(conn):
        conn.execute("DELETE FROM instances")
        conn.execute("DELETE FROM studies")
    for table in ("instance_facts", "study_expectations", "expected_instances"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


def test_assembler_tick_completes_and_audits(spool: Spool, conn: sqlite3.Connection) -> None:
    store(spool, "1.2.3.1", 100.0, SOPClassUID=DX, Modality="DX")
    assembler = Assembler(spool.db_path, RULES)
    assert assembler.tick(conn, 101.0) == []
    (completion,) = assembler.tick(conn, 102.0)
    assert (completion.rule, completion.instance_count, completion.wait_s) == (
        RULE_QUIET_SINGLE_IMAGE, 1, 2.0)
    events = {e["event"]: e for e in audit.read_events(spool.root, STUDY)}
    assert {k: events["complete"][k] for k in ("rule", "generation", "instance_count",
                                               "quiet_period_s", "wait_s")} == {
        "rule": "quiet-single-image", "generation": 1, "instance_count": 1,
        "quiet_period_s": 2.0, "wait_s": 2.0}
    assert "job_queued" in events


def test_rules_from_settings_and_their_validation() -> None:
    settings = Settings()
    assert CompletionRules.from_settings(settings.studies) == CompletionRules(30.0, 2.0, 600.0)
    assert validate(settings) == []
    settings.studies.single_image_quiet_period_s = -1.0
    settings.studies.maximum_wait_s = 10.0
    assert validate(settings) == [
        "studies.single_image_quiet_period_s: must not be negative",
        "studies.maximum_wait_s: must be at least studies.quiet_period_s and "
        "studies.single_image_quiet_period_s"]
    env = {"DICOM_AI_STUDIES_MAXIMUM_WAIT_S": "900",
           "DICOM_AI_STUDIES_SINGLE_IMAGE_QUIET_PERIOD_S": "1.5"}
    loaded = load_settings(None, env=env)
    assert (loaded.studies.maximum_wait_s, loaded.studies.single_image_quiet_period_s) == (
        900.0, 1.5)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_read_facts_in_every_transfer_syntax(tmp_path: Path, syntax: str) -> None:
    # A deflated data set goes through pydicom, the others through the element walk.
    path = tmp_path / "i.dcm"
    for attrs, kind in (({"Modality": "OP"}, SINGLE), ({"Modality": "OP", "NumberOfFrames": 8},
                                                       LONG)):
        ds = pydicom.dcmread(BytesIO(encoded("1.2.3.1", SOPClassUID=OP8,
                                             NumberOfSeriesRelatedInstances=4,
                                             NumberOfStudyRelatedInstances=9, **attrs)))
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        del ds.PixelData  # pydicom converts no pixel data to big endian
        pydicom.dcmwrite(path, ds, enforce_file_format=True,
                         little_endian=syntax != ExplicitVRBigEndian)
        assert read_facts(path, OP8) == InstanceFacts(kind, study_related_instances=9,
                                                      series_related_instances=4), syntax


def test_read_facts_past_a_long_header(tmp_path: Path) -> None:
    # Number of Frames beyond the walked prefix (a long sequence before it): pydicom finds it.
    ds = pydicom.dcmread(BytesIO(encoded("1.2.3.1", SOPClassUID=OP8, Modality="OP",
                                         NumberOfFrames=3)))
    item = Dataset()
    item.CodeMeaning = "x" * 60
    ds.ProcedureCodeSequence = [item] * 2000
    path = tmp_path / "i.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size > FACTS_PREFIX
    assert read_facts(path, OP8).kind == LONG


@pytest.mark.skipif(not shutil.which("storescu"), reason="needs DCMTK (apt: dcmtk)")
def test_a_manifest_sent_by_dcmtk_completes_the_study(tmp_path: Path) -> None:
    # DCMTK's storescu as the PACS: three CT images and the manifest listing them, in one
    # association, to the real listener; the manifest completes the study at once.
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 1
    spool = Spool(tmp_path / "spool")
    server = start_scp(settings, spool)
    files = []
    for i, data in enumerate([encoded(f"1.2.3.{i + 1}", study=STUDY, series=S1)
                              for i in range(3)]
                             + [manifest("1.2.9.1", {S1: ["1.2.3.1", "1.2.3.2", "1.2.3.3"]})]):
        files.append(tmp_path / f"{i}.dcm")
        files[-1].write_bytes(data)
    try:
        result = subprocess.run(
            ["storescu", "-aet", "PACS", "-aec", "DICOMAI", "127.0.0.1",
             str(server.server_address[1]), *map(str, files)], capture_output=True, text=True,
            timeout=60, env=dict(os.environ, TCP_NODELAY="1"))
        assert result.returncode == 0, result.stderr
        conn = db.connect(spool.db_path)
        (last,) = conn.execute("SELECT last_received FROM studies").fetchone()
        assert due(spool, conn, float(last)) == [(STUDY, 1, RULE_MANIFEST)]
        conn.close()
    finally:
        server.stop()
        spool.close()


def test_every_rule_is_in_the_conformance_statement() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "conformance-statement.md").read_text()
    assert [rule for rule in studies.RULES if f"| `{rule}` |" not in text] == []
