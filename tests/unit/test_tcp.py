"""The TCP server under the DICOM listener and the HTTP endpoint."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator

from dicom_ai.service.tcp import BoundedThreadingTCPServer


class _CloseAtOnce(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.close()


@contextlib.contextmanager
def _serving(server: BoundedThreadingTCPServer) -> Iterator[tuple[str, int]]:
    """``server`` answering in a thread; its address. Shut down and closed on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_a_restarted_server_binds_the_port_its_closed_connections_hold() -> None:
    first = BoundedThreadingTCPServer(("127.0.0.1", 0), _CloseAtOnce, max_connections=2)
    port = first.server_address[1]
    with _serving(first) as address, socket.create_connection(address, timeout=5) as client:
        # The server closes first, so its side of the connection is the one in TIME_WAIT.
        assert client.recv(1) == b""
    again = BoundedThreadingTCPServer(("127.0.0.1", port), _CloseAtOnce, max_connections=2)
    again.server_close()


def test_a_connection_over_the_limit_is_closed_and_reported() -> None:
    refused: list[object] = []
    hold = threading.Event()

    class Hold(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            hold.wait(5)

    class Server(BoundedThreadingTCPServer):
        def connection_refused(self, client_address: object) -> None:
            refused.append(client_address)

    server = Server(("127.0.0.1", 0), Hold, max_connections=1)
    try:
        with _serving(server) as address, \
                socket.create_connection(address, timeout=5) as held, \
                socket.create_connection(address, timeout=5) as extra:
            assert extra.recv(1) == b""
            assert len(refused) == 1
            hold.set()
            assert held.recv(1) == b""
    finally:
        hold.set()
