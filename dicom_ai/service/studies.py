"""Study assembly: when a study is complete, decided per study by the first rule that applies.

DICOM has no general "end of study" message. What a study's instances, a PACS's manifest or the
modality itself say about it decides, and a quiet period covers the rest. The listener records
what an instance says (:func:`record_facts`) as it indexes it, from the same walk of the header
that reads its filing keys; each tick of the :class:`Assembler` reads it from the files of the
instances it was not recorded for (manifests, headers the walk leaves to pydicom, instances
indexed by the start-up scan; :func:`inspect_new_instances`), then applies, to each study
still receiving, the first of these rules that holds (:func:`complete_due_studies`):

``mpps``
    A Modality Performed Procedure Step that names the study (:mod:`dicom_ai.service.mpps`) is
    COMPLETED and every instance of its Performed Series Sequence has arrived. While a step that
    names the study is IN PROGRESS, the quiet periods do not apply (the modality is still
    scanning); the maximum wait does.
``mpps-discontinued``
    Such a step was DISCONTINUED: what has arrived is processed as it is.
``manifest``
    A Key Object Selection manifest (document title (113030, DCM, "Manifest"), as a PACS sends
    with a study) lists instances of the study, and every one of them has arrived.
``instance-count``
    The instances carry Number of Study Related Instances (0020,1208) and that many have
    arrived, or Number of Study Related Series (0020,1206) and that many series have reached
    their Number of Series Related Instances (0020,1209).
``maximum-wait``
    ``studies.maximum_wait_s`` (600 s) after the first instance of the current generation,
    whatever else holds: instances still trickling in, a count never reached, a step left IN
    PROGRESS.
``quiet-single-image``
    Every image is a single-image object (CR, DX, ophthalmic, VL or dermoscopic photography,
    single-frame Secondary Capture of those modalities; non-image objects such as SR, KOS and
    presentation states do not count either way) and ``studies.single_image_quiet_period_s``
    (2 s) passed without a new instance.
``quiet-series-complete``
    Every image series has reached its Number of Series Related Instances, and the same short
    quiet period passed (only the pause before a next series is left to wait out).
``quiet``
    ``studies.quiet_period_s`` (30 s) without a new instance: CT, MR, multi-frame objects and
    anything else. 30 s covers the pause between series of one modality push and a PACS
    forwarding a study over several associations.

An expectation that completed a generation (a manifest, a count, a step) is *consumed*: it does
not complete that study again. An instance with a new SOP Instance UID arriving after completion
re-opens the study: the generation goes up, a still-queued job of the older generation is marked
``superseded``, and the new generation completes by the rules above — by a quiet period or the
maximum wait, unless a new manifest or step arrives. Result UIDs are derived from the source SOP
Instance UIDs, so the new SR has new UIDs (a new SR series) beside the earlier one, while objects
whose inputs did not change (e.g. the SC of an unchanged image) keep their UIDs and are not sent
twice.

Completing a study queues a job for its current generation; :func:`_complete` is the one place
where that happens, and :meth:`Assembler._announce` the one place that reports it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread, read_partial
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom_ai.config import StudySettings
from dicom_ai.dicom.elements import ScanError, scan_top_level, top_level_values
from dicom_ai.dicom.uid import is_valid_uid
from dicom_ai.logs import log_failure
from dicom_ai.service import audit, db
from dicom_ai.service.lanes import study_lane

log = logging.getLogger(__name__)

RULE_MPPS = "mpps"
RULE_MPPS_DISCONTINUED = "mpps-discontinued"
RULE_MANIFEST = "manifest"
RULE_INSTANCE_COUNT = "instance-count"
RULE_MAXIMUM_WAIT = "maximum-wait"
RULE_QUIET_SINGLE_IMAGE = "quiet-single-image"
RULE_QUIET_SERIES_COMPLETE = "quiet-series-complete"
RULE_QUIET = "quiet"
#: Every rule, in the order they are tried.
RULES = (RULE_MPPS, RULE_MPPS_DISCONTINUED, RULE_MANIFEST, RULE_INSTANCE_COUNT,
         RULE_MAXIMUM_WAIT, RULE_QUIET_SINGLE_IMAGE, RULE_QUIET_SERIES_COMPLETE, RULE_QUIET)

#: Single-frame projection radiography and photography Storage SOP Classes (PS3.4 B.5).
SINGLE_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",          # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",        # Digital X-Ray, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",      # Digital X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.77.1.4",     # VL Photographic
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",   # Ophthalmic Photography 8 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",   # Ophthalmic Photography 16 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.7",     # Dermoscopic Photography
})
#: Secondary Capture Image Storage: single-image only for the modalities below (a CT localizer
#: or a screen capture of a volume is also Secondary Capture).
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SINGLE_IMAGE_MODALITIES = frozenset({"CR", "DX", "OP", "XC", "DMS"})
#: SOP Class UID prefixes of objects that say nothing about how a study is sent: SR and Key
#: Object Selection (…88.), presentation states (…11.), encapsulated documents (…104.).
NEUTRAL_SOP_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                              "1.2.840.10008.5.1.4.1.1.104.")
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
#: Document titles (Concept Name Code, DCM) of a Key Object Selection that lists a whole study:
#: Manifest and Signed Manifest (PS3.16 CID 7010). Other titles ("Of Interest", "For
#: Teaching", "Rejected for Quality Reasons" …) list a selection, not the study.
MANIFEST_TITLES = frozenset({"113030", "113031"})
#: A manifest file larger than this is not read (a manifest of 100,000 instances is ≈ 10 MB).
MAXIMUM_MANIFEST_BYTES = 32 * 1024 * 1024

#: Kinds of instance (``instance_facts.kind``).
SINGLE, LONG, NEUTRAL = "single", "long", "neutral"

_MODALITY, _NUMBER_OF_FRAMES = 0x00080060, 0x00280008
_STUDY_SERIES, _STUDY_INSTANCES, _SERIES_INSTANCES = 0x00201206, 0x00201208, 0x00201209
#: The tags :class:`InstanceFacts` are read from.
FACT_TAGS = (_MODALITY, _STUDY_SERIES, _STUDY_INSTANCES, _SERIES_INSTANCES, _NUMBER_OF_FRAMES)
#: Leading bytes of a file whose header is walked for the facts (the facts lie in its first
#: kilobytes unless a long sequence comes before them).
FACTS_PREFIX = 64 * 1024
#: Most instances one tick inspects, so that a tick stays short while a large study streams in.
INSPECT_BATCH = 2000
#: Final MPPS objects (and forgotten IN PROGRESS ones) are removed this long after their last
#: update: a week, long after anything they could complete has arrived.
MPPS_KEEP_S = 7 * 86400.0
_MPPS_PRUNE_INTERVAL_S = 3600.0


@dataclass(frozen=True)
class CompletionRules:
    """The settings of the time-based rules.

    Parameters
    ----------
    quiet_period_s:
        ``studies.quiet_period_s``.
    single_image_quiet_period_s:
        ``studies.single_image_quiet_period_s``.
    maximum_wait_s:
        ``studies.maximum_wait_s``.
    """

    quiet_period_s: float
    single_image_quiet_period_s: float
    maximum_wait_s: float

    @classmethod
    def from_settings(cls, settings: StudySettings) -> CompletionRules:
        """The rules of the ``studies`` settings."""
        return cls(settings.quiet_period_s, settings.single_image_quiet_period_s,
                   settings.maximum_wait_s)

    @classmethod
    def uniform(cls, quiet_period_s: float) -> CompletionRules:
        """One quiet period for every study and no maximum wait."""
        return cls(quiet_period_s, quiet_period_s, math.inf)

    @property
    def shortest_s(self) -> float:
        """The shortest wait of the rules."""
        return min(self.quiet_period_s, self.single_image_quiet_period_s, self.maximum_wait_s)


@dataclass(frozen=True)
class Completion:
    """A study generation completed, and why."""

    study_instance_uid: str
    generation: int
    #: One of :data:`RULES`.
    rule: str
    instance_count: int
    #: Seconds from the generation's first instance to its completion.
    wait_s: float


@dataclass(frozen=True)
class InstanceFacts:
    """What completion reads from one instance."""

    kind: str
    study_related_series: int | None = None
    study_related_instances: int | None = None
    series_related_instances: int | None = None


def record_arrival(conn: sqlite3.Connection, study_instance_uid: str, now: float, *,
                   new_instance: bool) -> None:
    """Note an instance's arrival; call inside the transaction that indexes the instance.

    Parameters
    ----------
    conn:
        Connection with an open write transaction.
    study_instance_uid:
        The instance's study.
    now:
        Arrival time, epoch seconds.
    new_instance:
        False when the SOP Instance UID was already indexed: a re-sent instance extends the
        quiet period of a study still receiving but does not re-open a completed one.
    """
    added = 1 if new_instance else 0
    (generation,) = conn.execute(
        "INSERT INTO studies (study_instance_uid, state, generation, instance_count, "
        "first_received, last_received, opened_at) VALUES (?, 'receiving', 1, ?, ?, ?, ?) "
        "ON CONFLICT (study_instance_uid) DO UPDATE SET "
        "  last_received = excluded.last_received, "
        "  instance_count = instance_count + excluded.instance_count, "
        "  generation = generation + (state = 'complete' AND excluded.instance_count > 0), "
        "  opened_at = CASE WHEN state = 'complete' AND excluded.instance_count > 0 "
        "    THEN excluded.last_received ELSE opened_at END, "
        "  state = CASE WHEN excluded.instance_count > 0 THEN 'receiving' ELSE state END, "
        "  completed_at = CASE WHEN excluded.instance_count > 0 THEN NULL ELSE completed_at END, "
        "  completed_rule = CASE WHEN excluded.instance_count > 0 THEN NULL "
        "    ELSE completed_rule END "
        "RETURNING generation",
        (study_instance_uid, added, now, now, now)).fetchone()
    # Only a study that has been re-opened (generation > 1) can hold a job of an older one.
    if new_instance and generation > 1:
        conn.execute(
            "UPDATE jobs SET state = 'superseded', finished_at = ? "
            "WHERE study_instance_uid = ? AND state = 'queued' AND generation < "
            "(SELECT generation FROM studies WHERE study_instance_uid = ?)",
            (now, study_instance_uid, study_instance_uid))


def classify(sop_class_uid: str, modality: str, frames: int | None) -> str:
    """The completion kind of an instance: :data:`SINGLE`, :data:`LONG` or :data:`NEUTRAL`.

    Parameters
    ----------
    sop_class_uid:
        Its SOP Class UID.
    modality:
        Its Modality (0008,0060); empty when absent.
    frames:
        Its Number of Frames (0028,0008); ``None`` when absent.
    """
    if sop_class_uid.startswith(NEUTRAL_SOP_CLASS_PREFIXES):
        return NEUTRAL
    if frames is not None and frames > 1:
        return LONG
    if sop_class_uid in SINGLE_IMAGE_SOP_CLASSES:
        return SINGLE
    if sop_class_uid == SECONDARY_CAPTURE and modality in SINGLE_IMAGE_MODALITIES:
        return SINGLE
    return LONG


def read_facts(path: Path, sop_class_uid: str) -> InstanceFacts:
    """Read :class:`InstanceFacts` from a stored instance's header (never its pixel data).

    The header's first :data:`FACTS_PREFIX` bytes are walked element by element (a few tens of
    microseconds; the assembler shares the listener's process); pydicom reads what the walk
    leaves to it. An unreadable header makes the instance :data:`LONG`: nothing shortens its
    study's wait.
    """
    try:
        with path.open("rb") as f:
            head = f.read(FACTS_PREFIX)
    except OSError:
        return InstanceFacts(LONG)
    facts = _walk_facts(head, sop_class_uid, complete=len(head) < FACTS_PREFIX)
    if facts is None:
        values = _pydicom_facts(path)
        facts = None if values is None else facts_from_values(values, sop_class_uid,
                                                               passed=True)
    return facts or InstanceFacts(LONG)


def facts_from_values(values: Mapping[int, bytes], sop_class_uid: str, *,
                      passed: bool) -> InstanceFacts | None:
    """The facts of the raw values a header walk found for :data:`FACT_TAGS`.

    Parameters
    ----------
    values:
        Raw values by tag (absent tags omitted).
    sop_class_uid:
        The instance's SOP Class UID.
    passed:
        Whether the walk went past :data:`FACT_TAGS` (or read the whole header), so that an
        absent tag is absent from the instance.

    Returns
    -------
    InstanceFacts or None
        ``None`` when the facts cannot be decided: Number of Frames, which decides the kind of
        a single-image SOP Class, may lie beyond the bytes walked.
    """
    frames_matter = sop_class_uid in SINGLE_IMAGE_SOP_CLASSES or sop_class_uid == SECONDARY_CAPTURE
    if frames_matter and not passed and _NUMBER_OF_FRAMES not in values:
        return None
    modality = values.get(_MODALITY, b"").decode("latin-1").strip("\0 ")
    return InstanceFacts(
        classify(sop_class_uid, modality, _count(values.get(_NUMBER_OF_FRAMES))),
        study_related_series=_count(values.get(_STUDY_SERIES)),
        study_related_instances=_count(values.get(_STUDY_INSTANCES)),
        series_related_instances=_count(values.get(_SERIES_INSTANCES)))


def facts_at_reception(values: Mapping[int, bytes], sop_class_uid: str, *,
                       passed: bool) -> InstanceFacts | None:
    """The facts the listener can record as it indexes an instance (see :func:`record_facts`).

    Same as :func:`facts_from_values`, except that a Key Object Selection gets ``None``: a
    manifest's list needs the whole object, which :func:`inspect_new_instances` reads from the
    file, as it does for every instance whose facts were not recorded at reception.
    """
    if sop_class_uid == KEY_OBJECT_SELECTION:
        return None
    return facts_from_values(values, sop_class_uid, passed=passed)


def _walk_facts(head: bytes, sop_class_uid: str, *, complete: bool) -> InstanceFacts | None:
    """The facts from a file's leading bytes; ``None``: ask pydicom."""
    if head[128:132] != b"DICM":
        return None
    try:
        meta = top_level_values(head[132:], (0x00020000, 0x00020010), implicit_vr=False,
                                little_endian=True)
        start = 132 + 12 + struct.unpack("<L", meta[0x00020000])[0]
        syntax = UID(meta[0x00020010].decode("ascii").strip("\0 "))
        if syntax.is_deflated or not syntax.is_transfer_syntax:
            return None
        values, passed = scan_top_level(head[start:], FACT_TAGS,
                                        implicit_vr=syntax.is_implicit_VR,
                                        little_endian=syntax.is_little_endian)
    except (ScanError, KeyError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return facts_from_values(values, sop_class_uid, passed=passed or complete)


def _pydicom_facts(path: Path) -> dict[int, bytes] | None:
    try:
        with path.open("rb") as f:
            ds = read_partial(f, stop_when=_after_facts, specific_tags=list(FACT_TAGS))
        return {tag: str(ds[tag].value if ds[tag].value is not None else "").encode("latin-1")
                for tag in FACT_TAGS if tag in ds and not ds[tag].VM > 1}
    except (InvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError,
            NotImplementedError, AttributeError, UnicodeEncodeError):
        return None


def _after_facts(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _NUMBER_OF_FRAMES)


def _count(raw: bytes | None) -> int | None:
    """A positive IS value, or ``None`` (absent, empty, malformed, multi-valued)."""
    try:
        number = int(raw.decode("ascii").strip("\0 ")) if raw else None
    except (UnicodeDecodeError, ValueError):
        return None
    return number if number is not None and number > 0 else None


def read_manifest(path: Path) -> dict[str, set[str]] | None:
    """The instances a Key Object Selection manifest lists, per Study Instance UID.

    Returns
    -------
    dict or None
        ``None`` when the object is not a manifest (another document title), cannot be read, or
        lists a malformed UID or nothing at all.
    """
    try:
        if path.stat().st_size > MAXIMUM_MANIFEST_BYTES:
            return None
        ds = dcmread(path, stop_before_pixels=True)
        title = ds.ConceptNameCodeSequence[0]
        if (str(title.CodingSchemeDesignator) != "DCM"
                or str(title.CodeValue) not in MANIFEST_TITLES):
            return None
        listed: dict[str, set[str]] = {}
        for study in ds.CurrentRequestedProcedureEvidenceSequence:
            study_uid = str(study.StudyInstanceUID)
            instances = listed.setdefault(study_uid, set())
            for series in study.ReferencedSeriesSequence:
                instances.update(str(i.ReferencedSOPInstanceUID)
                                 for i in series.ReferencedSOPSequence)
    except (InvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError, IndexError,
            NotImplementedError, AttributeError):
        return None
    uids = [*listed, *(u for s in listed.values() for u in s)]
    if not any(listed.values()) or not all(is_valid_uid(u) for u in uids):
        return None
    return listed


def inspect_new_instances(conn: sqlite3.Connection, root: Path,
                          limit: int = INSPECT_BATCH) -> int:
    """Read the facts of instances not yet inspected, in studies still receiving.

    The files are read outside any transaction; what they say is written in one.

    Parameters
    ----------
    conn:
        Connection to the index (not in a transaction).
    root:
        ``storage.directory`` (instance paths are relative to it).
    limit:
        Most instances read by this call.

    Returns
    -------
    int
        The number of instances inspected.
    """
    rows = conn.execute(
        "SELECT i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid, "
        "i.sop_class_uid, i.path FROM instances i "
        "JOIN studies s ON s.study_instance_uid = i.study_instance_uid "
        "WHERE s.state = 'receiving' AND NOT EXISTS "
        "(SELECT 1 FROM instance_facts f WHERE f.sop_instance_uid = i.sop_instance_uid) "
        "LIMIT ?", (limit,)).fetchall()
    found = []
    for sop_uid, study_uid, series_uid, sop_class, rel in rows:
        path = root / str(rel)
        facts = read_facts(path, str(sop_class))
        manifest = read_manifest(path) if sop_class == KEY_OBJECT_SELECTION else None
        found.append((str(sop_uid), str(study_uid), str(series_uid), facts, manifest))
    if not found:
        return 0
    with db.transaction(conn):
        for sop_uid, study_uid, series_uid, facts, manifest in found:
            record_facts(conn, sop_uid, study_uid, series_uid, facts, manifest)
    return len(found)


def record_facts(conn: sqlite3.Connection, sop_instance_uid: str, study_instance_uid: str,
                 series_instance_uid: str, facts: InstanceFacts,
                 manifest: Mapping[str, set[str]] | None = None) -> None:
    """Record an instance's facts and the expectations they announce.

    Parameters
    ----------
    conn:
        Connection with an open write transaction.
    sop_instance_uid, study_instance_uid, series_instance_uid:
        The instance.
    facts:
        What it says.
    manifest:
        The instances it lists per study, when it is a manifest (:func:`read_manifest`).
    """
    conn.execute("INSERT OR REPLACE INTO instance_facts (sop_instance_uid, "
                 "study_instance_uid, kind) VALUES (?, ?, ?)",
                 (sop_instance_uid, study_instance_uid, facts.kind))
    for source, key, count in (
            ("study-series", "", facts.study_related_series),
            ("study-instances", "", facts.study_related_instances),
            ("series-instances", series_instance_uid, facts.series_related_instances)):
        if count is not None:
            _expect(conn, study_instance_uid, source, key, count)
    for listed_study, instances in (manifest or {}).items():
        _expect(conn, listed_study, "manifest", sop_instance_uid, len(instances))
        conn.executemany(
            "INSERT OR IGNORE INTO expected_instances (study_instance_uid, source_key, "
            "sop_instance_uid) VALUES (?, ?, ?)",
            [(listed_study, sop_instance_uid, u) for u in sorted(instances)])


def _expect(conn: sqlite3.Connection, study_uid: str, source: str, key: str,
            count: int) -> None:
    # A changed count (a PACS that learnt of more instances) is a new expectation.
    conn.execute(
        "INSERT INTO study_expectations (study_instance_uid, source, source_key, expected_count) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (study_instance_uid, source, source_key) DO UPDATE SET "
        "consumed = consumed AND expected_count = excluded.expected_count, "
        "expected_count = excluded.expected_count", (study_uid, source, key, count))


#: A manifest of the study, not consumed, every listed instance arrived.
_MANIFEST_MET = (
    "study_instance_uid = :study AND source = 'manifest' AND NOT EXISTS ("
    "  SELECT 1 FROM expected_instances e WHERE e.study_instance_uid = :study "
    "  AND e.source_key = study_expectations.source_key AND NOT EXISTS ("
    "    SELECT 1 FROM instances i WHERE i.sop_instance_uid = e.sop_instance_uid))")
#: Per series of the study: its instances and, of them, images (not neutral objects).
_SERIES_COUNTS = (
    "SELECT i.series_instance_uid AS series, COUNT(*) AS n, "
    "  SUM(COALESCE(f.kind, '') != 'neutral') AS images FROM instances i "
    "LEFT JOIN instance_facts f ON f.sop_instance_uid = i.sop_instance_uid "
    "WHERE i.study_instance_uid = :study GROUP BY i.series_instance_uid")
#: The series count of the study's expectation ``x`` is met by series ``g``.
_SERIES_MET_BY_G = (
    "x.study_instance_uid = :study AND x.source = 'series-instances' "
    "AND x.source_key = g.series AND x.expected_count <= g.n")
#: A study count reached.
_COUNT_MET = (
    "study_instance_uid = :study AND ("
    "  (source = 'study-instances' AND expected_count <= "
    "    (SELECT s.instance_count FROM studies s WHERE s.study_instance_uid = :study)) "
    "  OR (source = 'study-series' AND expected_count <= (SELECT COUNT(*) FROM ("
    + _SERIES_COUNTS + ") g JOIN study_expectations x ON " + _SERIES_MET_BY_G + ")))")
#: A series of the study with an image that has not reached its announced count (or announced
#: none).
_SERIES_OPEN = (
    "SELECT 1 FROM (" + _SERIES_COUNTS + ") g WHERE g.images > 0 AND NOT EXISTS ("
    "  SELECT 1 FROM study_expectations x WHERE " + _SERIES_MET_BY_G + ")")
#: Instances of an MPPS's Performed Series Sequence not (yet) received.
_MPPS_MISSING = (
    "SELECT 1 FROM mpps_instances mi WHERE mi.mpps_uid = m.sop_instance_uid AND NOT EXISTS ("
    "  SELECT 1 FROM instances i WHERE i.sop_instance_uid = mi.sop_instance_uid)")
_MPPS_LISTS = "SELECT 1 FROM mpps_instances mi WHERE mi.mpps_uid = m.sop_instance_uid"


def _mpps_verdict(conn: sqlite3.Connection, study: str) -> str | None:
    """What the study's unconsumed MPPS objects say: a rule, ``"hold"`` or nothing.

    A COMPLETED step decides only when it lists instances, and only once all have arrived; one
    that lists none, or whose instances do not all come (a routing rule sending us a part of the
    exam), leaves the study to the other rules.
    """
    steps = conn.execute(
        "SELECT m.status, EXISTS (" + _MPPS_LISTS + "), EXISTS (" + _MPPS_MISSING + ") "
        "FROM mpps_studies ms JOIN mpps m ON m.sop_instance_uid = ms.mpps_uid "
        "WHERE ms.study_instance_uid = ? AND ms.consumed = 0", (study,)).fetchall()
    statuses = [str(s[0]) for s in steps]
    if "IN PROGRESS" in statuses:
        return "hold"
    completed = [(bool(lists), bool(missing)) for status, lists, missing in steps
                 if status == "COMPLETED"]
    if completed:
        return RULE_MPPS if all(lists and not missing for lists, missing in completed) else None
    return RULE_MPPS_DISCONTINUED if "DISCONTINUED" in statuses else None


def _exists(conn: sqlite3.Connection, sql: str, study: str) -> bool:
    return bool(conn.execute(f"SELECT EXISTS ({sql})", {"study": study}).fetchone()[0])


def due_rule(conn: sqlite3.Connection, study: str, opened_at: float, last_received: float,
             now: float, rules: CompletionRules) -> str | None:
    """The rule that completes a receiving study at ``now``, or ``None`` (not yet).

    Parameters
    ----------
    conn:
        Connection to the index.
    study:
        Study Instance UID.
    opened_at:
        First arrival of the current generation, epoch seconds.
    last_received:
        Last arrival, epoch seconds.
    now:
        Epoch seconds.
    rules:
        The time-based rules' settings.
    """
    mpps = _mpps_verdict(conn, study)
    if mpps in (RULE_MPPS, RULE_MPPS_DISCONTINUED):
        return mpps
    if _exists(conn, "SELECT 1 FROM study_expectations WHERE consumed = 0 AND "
               + _MANIFEST_MET, study):
        return RULE_MANIFEST
    if _exists(conn, "SELECT 1 FROM study_expectations WHERE consumed = 0 AND " + _COUNT_MET,
               study):
        return RULE_INSTANCE_COUNT
    if now - opened_at >= rules.maximum_wait_s:
        return RULE_MAXIMUM_WAIT
    if mpps == "hold":
        return None
    quiet = now - last_received
    if quiet >= rules.quiet_period_s:
        return RULE_QUIET
    if quiet < rules.single_image_quiet_period_s:
        return None
    kinds = {str(r[0]) for r in conn.execute(
        "SELECT DISTINCT COALESCE(f.kind, '') FROM instances i LEFT JOIN instance_facts f "
        "ON f.sop_instance_uid = i.sop_instance_uid WHERE i.study_instance_uid = ?", (study,))}
    if "" in kinds:
        return None  # not inspected yet: the next tick knows more
    if SINGLE in kinds and LONG not in kinds:
        return RULE_QUIET_SINGLE_IMAGE
    if LONG in kinds and not _exists(conn, _SERIES_OPEN, study):
        return RULE_QUIET_SERIES_COMPLETE
    return None


def complete_due_studies(conn: sqlite3.Connection, now: float,
                         rules: CompletionRules) -> list[Completion]:
    """Complete every receiving study that a rule completes at ``now``, queueing its job.

    The rules are evaluated without holding the write lock; a study is completed only if no
    instance arrived for it since.

    Returns
    -------
    list of Completion
        The study generations completed by this call.
    """
    receiving = conn.execute(
        "SELECT study_instance_uid, generation, COALESCE(opened_at, first_received), "
        "last_received FROM studies WHERE state = 'receiving'").fetchall()
    due = [(str(uid), int(gen), float(opened), float(last), rule)
           for uid, gen, opened, last in receiving
           if (rule := due_rule(conn, str(uid), float(opened), float(last), now, rules))]
    if not due:
        return []
    completed: list[Completion] = []
    with db.transaction(conn):
        for uid, generation, opened, last, rule in due:
            completion = _complete(conn, uid, generation, last, rule, now, now - opened)
            if completion is not None:
                completed.append(completion)
    return completed


def complete_quiet_studies(conn: sqlite3.Connection, now: float,
                           quiet_period_s: float) -> list[tuple[str, int]]:
    """:func:`complete_due_studies` with one quiet period for every study and no maximum wait.

    Returns
    -------
    list of (study_instance_uid, generation)
        The studies completed by this call.
    """
    return [(c.study_instance_uid, c.generation)
            for c in complete_due_studies(conn, now, CompletionRules.uniform(quiet_period_s))]


def _complete(conn: sqlite3.Connection, study: str, generation: int, last_received: float,
              rule: str, now: float, wait_s: float) -> Completion | None:
    """Complete one study generation by ``rule`` and queue its job (inside a transaction).

    Returns ``None`` when the study changed since the rule was evaluated (a new arrival).
    What completed it is consumed: the manifests and counts now met and the final MPPS objects
    whose instances arrived (or that were discontinued).
    """
    row = conn.execute(
        "UPDATE studies SET state = 'complete', completed_at = ?, completed_rule = ? "
        "WHERE study_instance_uid = ? AND state = 'receiving' AND generation = ? "
        "AND last_received = ? RETURNING instance_count",
        (now, rule, study, generation, last_received)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE study_expectations SET consumed = 1 WHERE consumed = 0 AND ("
                 + _MANIFEST_MET + " OR " + _COUNT_MET + ")", {"study": study})
    conn.execute(
        "UPDATE mpps_studies SET consumed = 1 WHERE study_instance_uid = ? AND consumed = 0 "
        "AND mpps_uid IN (SELECT m.sop_instance_uid FROM mpps m WHERE m.status = 'DISCONTINUED' "
        "  OR (m.status = 'COMPLETED' AND EXISTS (" + _MPPS_LISTS + ") "
        "      AND NOT EXISTS (" + _MPPS_MISSING + ")))", (study,))
    _queue_job(conn, study, generation, now)
    return Completion(study, generation, rule, int(row[0]), wait_s)


def queue_unprocessed(conn: sqlite3.Connection, now: float) -> int:
    """Queue a job for every complete study whose current generation has none (start-up check).

    Returns
    -------
    int
        The number of jobs queued.
    """
    with db.transaction(conn):
        rows = conn.execute(
            "SELECT s.study_instance_uid, s.generation FROM studies s "
            "WHERE s.state = 'complete' AND NOT EXISTS (SELECT 1 FROM jobs j "
            "WHERE j.study_instance_uid = s.study_instance_uid "
            "AND j.generation = s.generation)").fetchall()
        for uid, generation in rows:
            _queue_job(conn, uid, generation, now)
    return len(rows)


class ReprocessRefused(Exception):
    """The study cannot be queued again; ``reason`` says why, in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reprocess(conn: sqlite3.Connection, study_instance_uid: str, now: float, *,
              audit_root: Path) -> tuple[int, str]:
    """Queue the current generation of a complete study again (``dicom-ai reprocess``).

    For a study that failed (a timeout, ``worker.max_attempts`` used up) once the cause is fixed,
    or one to read again with upgraded models. The job keeps its row: its state goes back to
    ``queued`` with its attempts at 0, and the trail gets a ``job_queued`` event naming the state
    it left. Results are idempotent: with the same models their UIDs are the ones already
    delivered, which are not sent twice.

    Parameters
    ----------
    conn:
        Connection to the index.
    study_instance_uid:
        The study.
    now:
        Epoch seconds.
    audit_root:
        ``storage.directory``.

    Returns
    -------
    tuple
        The generation queued, and the state its job left (``"none"`` if it had none).

    Raises
    ------
    ReprocessRefused
        The study is unknown, still receiving, already queued or running, or its instances were
        removed by retention.
    """
    with db.transaction(conn):
        study = conn.execute("SELECT state, generation FROM studies WHERE study_instance_uid = ?",
                             (study_instance_uid,)).fetchone()
        if study is None:
            raise ReprocessRefused("no such study in the index (never received, or removed by "
                                   "retention)")
        state, generation = str(study[0]), int(study[1])
        if state != "complete":
            raise ReprocessRefused("the study is still receiving; it is analysed when complete")
        instances = conn.execute("SELECT COUNT(*) FROM instances WHERE study_instance_uid = ?",
                                 (study_instance_uid,)).fetchone()[0]
        if not instances:
            raise ReprocessRefused("the study has no instances left (removed by retention)")
        job = conn.execute("SELECT id, state FROM jobs WHERE study_instance_uid = ? AND "
                           "generation = ?", (study_instance_uid, generation)).fetchone()
        if job is None:
            _queue_job(conn, study_instance_uid, generation, now)
            left = "none"
        elif str(job[1]) in ("queued", "running"):
            raise ReprocessRefused(f"job {job[0]} of generation {generation} is already "
                                   f"{job[1]}")
        else:
            conn.execute("UPDATE jobs SET state = 'queued', attempts = 0, last_error = NULL, "
                         "outputs = 0, created_at = ?, started_at = NULL, finished_at = NULL, "
                         "worker_pid = NULL WHERE id = ?", (now, job[0]))
            left = str(job[1])
        job_id = conn.execute("SELECT id FROM jobs WHERE study_instance_uid = ? AND "
                              "generation = ?", (study_instance_uid, generation)).fetchone()[0]
        # Before the commit, so that the trail has it before the worker's "job_started".
        audit.record(audit_root, study_instance_uid, "job_queued", now=now,
                     generation=generation, job_id=int(job_id), reprocess_of=left)
    return generation, left


def _queue_job(conn: sqlite3.Connection, study_instance_uid: str, generation: int,
               now: float) -> None:
    conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at, lane) "
                 "VALUES (?, ?, 'queued', ?, ?) ON CONFLICT DO NOTHING",
                 (study_instance_uid, generation, now, study_lane(conn, study_instance_uid)))


def forget_old_mpps(conn: sqlite3.Connection, now: float) -> int:
    """Remove MPPS objects not updated for :data:`MPPS_KEEP_S` (their parts go with them).

    Returns
    -------
    int
        The number removed.
    """
    with db.transaction(conn):
        return int(conn.execute("DELETE FROM mpps WHERE updated_at < ?",
                                (now - MPPS_KEEP_S,)).rowcount)


def finished_before(conn: sqlite3.Connection, cutoff: float,
                    study_instance_uid: str | None = None) -> list[str]:
    """Studies whose work is over and whose last instance arrived before ``cutoff``.

    Finished means: complete, the job of its current generation ``done`` or ``failed``, no job
    queued or running, and no delivery ``pending`` or ``dead`` (a dead letter waits for the
    operator's ``dicom-ai retry``).

    Parameters
    ----------
    conn:
        Connection to the index.
    cutoff:
        Epoch seconds.
    study_instance_uid:
        Check only this study.
    """
    rows = conn.execute(
        "SELECT s.study_instance_uid FROM studies s "
        "WHERE s.state = 'complete' AND s.last_received < ? "
        "AND (? IS NULL OR s.study_instance_uid = ?) "
        "AND EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid "
        "  AND j.generation = s.generation AND j.state IN ('done', 'failed')) "
        "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid "
        "  AND j.state IN ('queued', 'running')) "
        "AND NOT EXISTS (SELECT 1 FROM outbound o "
        "  WHERE o.study_instance_uid = s.study_instance_uid AND o.state IN ('pending', 'dead'))",
        (cutoff, study_instance_uid, study_instance_uid)).fetchall()
    return [str(r[0]) for r in rows]


class Assembler(threading.Thread):
    """Background thread that inspects new instances and completes due studies.

    Parameters
    ----------
    db_path:
        The index database (in ``storage.directory``, where instance paths start).
    rules:
        The time-based rules' settings.
    """

    def __init__(self, db_path: Path, rules: CompletionRules) -> None:
        super().__init__(name="study-assembler", daemon=True)
        self._db_path = db_path
        self._rules = rules
        self._stop_event = threading.Event()
        # Eight ticks per shortest wait bound the extra delay to an eighth of it.
        self._tick = min(1.0, max(0.05, rules.shortest_s / 8))
        self._pruned_at = -math.inf

    def stop(self) -> None:
        """Ask the thread to finish; it exits within one tick."""
        self._stop_event.set()

    def run(self) -> None:
        conn = db.connect(self._db_path)
        try:
            while not self._stop_event.wait(self._tick):
                try:
                    self.tick(conn, time.time())
                except sqlite3.Error as exc:
                    # A busy or failing index must not end assembly for good; try next tick.
                    log_failure(log, "study assembly failed; retrying", exc)
        finally:
            conn.close()

    def tick(self, conn: sqlite3.Connection, now: float) -> list[Completion]:
        """One round: inspect what arrived, complete and announce what is due, now and then
        forget old MPPS objects."""
        inspect_new_instances(conn, self._db_path.parent)
        completed = complete_due_studies(conn, now, self._rules)
        for completion in completed:
            self._announce(conn, completion)
        if now - self._pruned_at >= _MPPS_PRUNE_INTERVAL_S:
            self._pruned_at = now
            forget_old_mpps(conn, now)
        return completed

    def _announce(self, conn: sqlite3.Connection, completion: Completion) -> None:
        """Log and audit one completion (the one place that reports it)."""
        log.info("study %s complete: rule=%s generation %d, %d instances, %.1f s after its "
                 "first instance; job queued", completion.study_instance_uid, completion.rule,
                 completion.generation, completion.instance_count, completion.wait_s)
        audit.study_complete(self._db_path.parent, conn, completion.study_instance_uid,
                             completion.generation, rule=completion.rule,
                             wait_s=round(completion.wait_s, 3), **self._rule_settings(
                                 completion.rule))

    def _rule_settings(self, rule: str) -> dict[str, float]:
        if rule == RULE_QUIET:
            return {"quiet_period_s": self._rules.quiet_period_s}
        if rule in (RULE_QUIET_SINGLE_IMAGE, RULE_QUIET_SERIES_COMPLETE):
            return {"quiet_period_s": self._rules.single_image_quiet_period_s}
        if rule == RULE_MAXIMUM_WAIT:
            return {"maximum_wait_s": self._rules.maximum_wait_s}
        return {}

