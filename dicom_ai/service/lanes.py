"""Priority lanes and the worker pool: no single-image study waits behind a CT.

Every job gets a *lane* when it is queued (:func:`lane_for`, :func:`study_lane`):

``fast``
    Studies of at most :data:`FAST_MAX_INSTANCES` single-frame projection images or photographs
    (CR, DX, mammography and intra-oral X-ray, ophthalmic, dermoscopic and other visible-light
    photographs, single-frame Secondary Capture). Their analysis takes about a second.
``bulk``
    Everything else: CT, MR and other volumes, multi-frame objects, unknown SOP classes, and
    single-image studies with more images than the fast lane takes. Such a job can take minutes.

The service runs several worker processes (:func:`plan_workers`). Each claims the oldest job of
the lanes it serves, fast before bulk (:func:`dicom_ai.service.worker.claim_job`). With two or
more workers the first serves the fast lane only, so a chest X-ray never waits for a CT, however
many CTs are queued or running; on a single CPU the two share it and the X-ray still finishes in
about twice its own time instead of after the CT. With one worker (``worker.processes = 1``, or
memory for only one) a fast job still never waits behind a *queued* CT: it is taken before any
bulk job, and waits at most for the CT running at the time. Running it *between* phases of that
CT is not done: the CT path is one pass (volume, lung mask, sliding-window inference, candidates,
SEG and SR) whose intermediate state (hundreds of MB) has no point to park at, while a second
process gives the same result for the memory of one more idle worker. A bulk job is never
starved by a stream of fast ones: after :data:`BULK_AGING_S` in the queue it is taken in arrival
order with them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FAST = "fast"
BULK = "bulk"
LANES = (FAST, BULK)

#: More images than this and the study is bulk even if each image is a fast one: a CR study with
#: PA and lateral views, both eyes in two fields each, a handful of dermoscopic lesions fit.
FAST_MAX_INSTANCES = 8

#: A bulk job queued this long is taken in arrival order with the fast jobs (seconds).
BULK_AGING_S = 120.0

#: Single-frame projection-radiography and photography Storage SOP Classes (PS3.4 B.5).
FAST_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",          # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",        # Digital X-Ray, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",      # Digital X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",        # Digital Mammography X-Ray, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",      # Digital Mammography X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.1.3",        # Digital Intra-Oral X-Ray, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.3.1",      # Digital Intra-Oral X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.7",          # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.77.1.4",     # VL Photographic
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",   # Ophthalmic Photography 8 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",   # Ophthalmic Photography 16 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.7",     # Dermoscopic Photography
})

#: Modalities of the fast SOP classes; a study that names another one (e.g. a CT localizer sent
#: as Secondary Capture) is bulk.
FAST_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "OP", "XC", "DMS", "OT", "SC"})

#: Most worker processes chosen automatically: more CT analyses at once than this divide the
#: CPUs so finely that each one gets slower than the queue gets shorter.
MAX_AUTO_PROCESSES = 4

#: Memory one worker may need: 450 MB resident idle with the five models loaded (torch
#: included), and the peak of the CT path, whose bound for a 1,000-slice CT is 2 GB. The pool
#: never plans more workers than this divides into the available memory.
WORKER_MEMORY_BYTES = 2 << 30


def lane_for(modalities: Iterable[str], sop_classes: Iterable[str], instance_count: int) -> str:
    """The lane of a study, from what its instances are.

    Parameters
    ----------
    modalities:
        Modality (0008,0060) values seen in the study; empty when not known.
    sop_classes:
        SOP Class UIDs of its instances.
    instance_count:
        Number of instances.

    Returns
    -------
    str
        :data:`FAST` or :data:`BULK`.
    """
    classes = set(sop_classes)
    if not 0 < instance_count <= FAST_MAX_INSTANCES or not classes:
        return BULK
    if not classes <= FAST_SOP_CLASSES:
        return BULK
    if not set(modalities) <= FAST_MODALITIES:
        return BULK
    return FAST


def study_lane(conn: sqlite3.Connection, study_instance_uid: str) -> str:
    """The lane of an indexed study, from its rows in ``instances`` (call when queuing its job)."""
    classes = [str(r[0]) for r in conn.execute(
        "SELECT DISTINCT sop_class_uid FROM instances WHERE study_instance_uid = ?",
        (study_instance_uid,))]
    (count,) = conn.execute("SELECT COUNT(*) FROM instances WHERE study_instance_uid = ?",
                            (study_instance_uid,)).fetchone()
    return lane_for((), classes, int(count))


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process of the pool."""

    #: Process name in logs (``worker-1`` …).
    name: str
    #: Lanes it claims jobs from, in order of preference.
    lanes: tuple[str, ...]
    #: torch threads for its inference.
    num_threads: int


def available_memory() -> int | None:
    """Bytes of memory available to this service: the smaller of the system's available memory
    and the cgroup (container) limit less its usage; None when neither can be read."""
    candidates: list[int] = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def default_processes(cpus: int, memory: int | None) -> int:
    """How many worker processes the machine takes (``worker.processes = 0``).

    One per usable CPU but the listener's, but at least two (the reserved fast-lane worker is idle
    but for the second a single-image study takes, so it costs memory, not CPU), at most
    :data:`MAX_AUTO_PROCESSES`, and no more than the available memory holds at
    :data:`WORKER_MEMORY_BYTES` each.

    Parameters
    ----------
    cpus:
        Usable CPUs (the affinity mask).
    memory:
        Available bytes, or None when not known.
    """
    count = min(MAX_AUTO_PROCESSES, max(2, cpus - 1))
    if memory is not None:
        count = min(count, max(1, memory // WORKER_MEMORY_BYTES))
    return count


def plan_workers(processes: int, cpus: int, num_threads: int = 0) -> list[WorkerPlan]:
    """The worker pool: which lanes each worker serves and its torch threads.

    Parameters
    ----------
    processes:
        Number of worker processes (at least one).
    cpus:
        Usable CPUs.
    num_threads:
        ``inference.num_threads``: torch threads per worker; 0 divides the CPUs left to workers
        (all but the listener's) among the bulk workers.
    """
    if processes < 1:
        raise ValueError("at least one worker process")
    bulk_workers = max(1, processes - 1)
    threads = num_threads or max(1, (cpus - 1) // bulk_workers)
    if processes == 1:
        return [WorkerPlan("worker-1", (FAST, BULK), threads)]
    return [WorkerPlan("worker-1", (FAST,), threads),
            *(WorkerPlan(f"worker-{i + 2}", (FAST, BULK), threads) for i in range(bulk_workers))]

