"""Set-up shared by the service's child processes (worker, exporter)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from dicom_ai.config import Settings
from dicom_ai.logs import configure_logging


def die_with_parent(parent_pid: int) -> None:
    """Make this child process end when the service process dies, even by SIGKILL.

    Otherwise a killed service would leave an orphan worker running jobs beside the worker of the
    restarted service. Linux ``PR_SET_PDEATHSIG``; elsewhere the parent check below still exits
    a child whose parent is already gone.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def child_setup(settings: Settings, parent_pid: int, name: str) -> None:
    """Common start of a service child process: logging as configured, die with the parent."""
    die_with_parent(parent_pid)
    # SIGINT goes to the whole process group on Ctrl-C; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, process=name)
