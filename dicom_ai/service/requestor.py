"""pynetdicom associations as requestor, without the race that loses a response to its reactor.

pynetdicom 3.0 runs a reactor thread per association that polls the DIMSE message queue. Each
``send_*`` method pauses it — clears ``Association._reactor_checkpoint``, then waits until
``Association._is_paused`` is true — and takes its response off the same queue. The reactor sets
``_is_paused`` just before it waits at the checkpoint and clears it only once it runs again. So
after a request resumes the reactor, the flag stays true until the reactor thread is next scheduled;
on a loaded machine that can be after the *next* request has been sent. That request then sees a
"paused" reactor, the reactor wakes, takes the response ("Received unexpected C-STORE service
message") and drops it, and the request waits its whole DIMSE timeout before it aborts the
association. A fast peer makes it likelier: a C-STORE refused at once (disk full) is answered
within a millisecond.

:func:`associate` replaces the checkpoint with :class:`ReactorCheckpoint`, which lets the reactor
past only while it is set and clears ``_is_paused`` in the same critical section: once a sender has
cleared the checkpoint, a true ``_is_paused`` means the reactor is at the checkpoint or on its way
to it, never past it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

#: Seconds :func:`associate` waits for the reactor to reach the new checkpoint once.
INSTALL_TIMEOUT_S = 5.0


class ReactorCheckpoint(threading.Event):
    """The reactor's checkpoint (a :class:`threading.Event` to pynetdicom) for one association.

    Parameters
    ----------
    association:
        The association whose reactor waits at it.
    """

    def __init__(self, association: Association) -> None:
        super().__init__()
        self._association = association
        self._open = threading.Condition()
        self._is_open = True
        #: Times the reactor went past; :func:`associate` waits for the first.
        self.passes = 0

    def is_set(self) -> bool:
        """Whether the reactor may run."""
        return self._is_open

    def set(self) -> None:
        """Let the reactor run."""
        with self._open:
            self._is_open = True
            self._open.notify_all()

    def clear(self) -> None:
        """Stop the reactor at its next pass (a sender then waits for ``_is_paused``)."""
        with self._open:
            self._is_open = False

    def wait(self, timeout: float | None = None) -> bool:
        """Called by the reactor: block while cleared; leave marked as running."""
        with self._open:
            if not self._open.wait_for(lambda: self._is_open, timeout):
                return False
            # In the same critical section as the check: a sender clearing the checkpoint
            # after this point sees False until the reactor comes back to the checkpoint.
            self._association._is_paused = False
            self.passes += 1
            return True


def associate(ae: AE, address: str, port: int, **kwargs: Any) -> Association:
    """:meth:`pynetdicom.AE.associate`, then :class:`ReactorCheckpoint` for its reactor.

    Parameters
    ----------
    ae:
        The requesting application entity.
    address, port:
        The peer.
    **kwargs:
        Passed to :meth:`~pynetdicom.AE.associate` (``ae_title``, ``tls_args``, ``evt_handlers``…).

    Returns
    -------
    pynetdicom.association.Association
        As ``AE.associate`` returns it; established or not.
    """
    assoc = ae.associate(address, port, **kwargs)
    if not assoc.is_established:
        return assoc
    checkpoint = ReactorCheckpoint(assoc)
    assoc._reactor_checkpoint = checkpoint
    # Until the reactor has gone through the new checkpoint once, it may still be between the
    # old one and its next poll of the queue with ``_is_paused`` true.
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    while not checkpoint.passes and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0005)
    return assoc
