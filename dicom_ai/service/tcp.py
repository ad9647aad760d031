"""The threading TCP server both of the service's endpoints stand on: a connection per thread,
at most so many at once."""

from __future__ import annotations

import contextlib
import socketserver
import threading
from typing import Any


class BoundedThreadingTCPServer(socketserver.ThreadingTCPServer):
    """A thread per connection, at most ``max_connections`` connections at once.

    One more is closed unanswered the moment it is accepted (after
    :meth:`connection_refused`), so a peer opening connections without end costs a file
    descriptor for an instant, never a thread.

    Parameters
    ----------
    address:
        Bind address and port.
    handler:
        The request handler class.
    max_connections:
        Connections served at once.
    """

    daemon_threads = True
    # A restarted service must get its port back while connections it closed are in TIME_WAIT
    # (the health check's, a modality's): without SO_REUSEADDR the bind fails for a minute.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler],
                 *, max_connections: int) -> None:
        self._connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler, bind_and_activate=True)

    def connection_refused(self, client_address: Any) -> None:
        """Called for each connection closed because the limit is reached (to log it)."""

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self.connection_refused(client_address)
            with contextlib.suppress(OSError):
                request.close()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()
