"""Set-up shared by the service's child processes (worker, exporter)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

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


def lowest_priority() -> str:
    """Put this process at the lowest CPU priority: ``SCHED_IDLE`` on Linux, else nice 19.

    A ``SCHED_IDLE`` process runs only on CPU time no normal process wants, so reception (normal
    priority) never waits for a model, and the model is never stopped. It applies to the calling
    thread and the threads it starts later: call it before torch starts its thread pool.

    Returns
    -------
    str
        What was applied, for the log.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))
    return f"nice {os.nice(0)}"


def child_setup(settings: Settings, parent_pid: int, name: str) -> None:
    """Common start of a service child process: die with the parent, logging as configured."""
    die_with_parent(parent_pid)
    # SIGINT goes to the whole process group on Ctrl-C; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, process=name)
