"""Set-up shared by the service's child processes (worker, exporter)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from types import FrameType

from dicom_ai.config import Settings
from dicom_ai.logs import configure_logging

log = logging.getLogger(__name__)

#: ``prctl`` option: the signal this process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this child process end when the service process dies, even by SIGKILL.

    Otherwise a killed service would leave an orphan worker running jobs beside the worker of the
    restarted service. Linux ``PR_SET_PDEATHSIG``, armed first thing in the child: the signal is
    sent when the *thread* that started the child ends, which is why the service starts and
    restarts its children from its main thread only. A parent that died before this call (or a
    system without ``prctl``) is caught by the check below and by :func:`orphaned`.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if orphaned(parent_pid):
        os._exit(1)


def orphaned(parent_pid: int) -> bool:
    """True when the service process that started this child is gone (we were re-parented)."""
    return os.getppid() != parent_pid


#: What ``worker.priority`` may name (:func:`set_priority`).
PRIORITIES = ("batch", "idle", "normal")

#: The nice value of ``batch``: CFS weight 110 against 1024 for the listener's nice 0, so under
#: contention the listener gets about 90 % of a shared core and the worker still about 10 %.
BATCH_NICE = 10


def set_priority(policy: str) -> str:
    """Lower this process's CPU priority as ``worker.priority`` says.

    ``batch``
        ``SCHED_BATCH`` at nice :data:`BATCH_NICE`: the scheduler treats the worker as a
        throughput job (its wake-ups never preempt a running task; the listener's do) with a
        small but non-zero share of a contended core, so a model keeps going beside the
        listener *and* beside any other normal process on the host.
    ``idle``
        ``SCHED_IDLE``: the worker runs only on CPU time no normal process wants. Reception never
        waits for it, but any other busy process on the host (a backup, another service)
        starves the analysis: measured 3.6 times slower beside a training job.
    ``normal``
        Unchanged.

    Without these policies (not Linux) ``batch`` and ``idle`` fall back to nice 10 and nice 19.
    It applies to the calling thread and the threads it starts later: call it before torch
    starts its thread pool.

    Parameters
    ----------
    policy:
        One of :data:`PRIORITIES`.

    Returns
    -------
    str
        What was applied, for the log.
    """
    if policy not in PRIORITIES:
        raise ValueError(f"unknown priority {policy!r}")
    if policy == "normal":
        return f"normal priority (nice {os.nice(0)})"
    name = "SCHED_IDLE" if policy == "idle" else "SCHED_BATCH"
    nice = 19 if policy == "idle" else BATCH_NICE
    applied = ""
    if hasattr(os, "sched_setscheduler") and hasattr(os, name):
        try:
            os.sched_setscheduler(0, getattr(os, name), os.sched_param(0))
            applied = name
        except OSError:
            pass
    if policy == "batch" or not applied:
        with contextlib.suppress(OSError):
            os.nice(max(0, nice - os.nice(0)))
    return f"{applied or 'nice'} (nice {os.nice(0)})"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; every CPU without one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def leave_listener_a_core() -> str:
    """Keep this process off the first usable CPU, so the listener always finds one free.

    Only the workers are confined; the listener may still run anywhere. With a single usable CPU
    nothing is changed (the scheduling policy alone protects reception there).

    Returns
    -------
    str
        What was applied, for the log.
    """
    cpus = usable_cpus()
    if len(cpus) < 2 or not hasattr(os, "sched_setaffinity"):
        return f"all {len(cpus)} CPUs"
    os.sched_setaffinity(0, cpus[1:])
    return f"CPUs {','.join(map(str, cpus[1:]))} (CPU {cpus[0]} left to the listener)"


def child_setup(settings: Settings, parent_pid: int, name: str) -> threading.Event:
    """Common start of a service child process: die with the parent, logging as configured.

    SIGTERM is the child's stop request, whoever sends it: the service (one child at a time) or
    a service manager signalling the whole process group (systemd's ``KillMode=control-group``,
    ``docker stop`` with ``--init``). The handler only sets the returned event, so the current
    job or delivery round finishes first. No multiprocessing primitive is shared with the
    parent for this: a ``multiprocessing.Event`` that a child died waiting on (SIGKILL, the OOM
    killer) makes the parent's ``set()`` block for ever.

    Returns
    -------
    threading.Event
        Set when this process is asked to stop.
    """
    die_with_parent(parent_pid)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    # SIGINT goes to the whole process group on Ctrl-C; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, process=name, fmt=settings.log_format)
    return stop
