"""The service's one HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``, and mounted routes.

``dicom-ai serve`` starts it in the main process (``[http]`` settings, ``127.0.0.1:9110`` by
default). It serves:

``/metrics``
    Prometheus text format (OpenMetrics when the scraper asks for it) from
    :mod:`dicom_ai.service.metrics`, plus the ``process_*`` metrics of the main process.
``/healthz``
    Liveness: the process answers and its DICOM listener still accepts connections. 200 or 503.
``/readyz``
    Readiness: storage (locked by this service, writable, free space above
    ``storage.minimum_free_mb``), the listener, every child process (worker(s), exporter) alive,
    and each destination not late (a delivery to it failing for longer than
    ``export.late_after_s``, from the outbound table). 200 or 503; the JSON body lists every
    check. ``?exclude=NAME`` leaves a check out — a name (``worker-2``), or a group
    (``destinations`` for all ``destinations/…``), as Kubernetes' own ``/readyz?exclude=`` does.

Other paths go to routes mounted with :meth:`HTTPEndpoint.add_route` (the status page at ``/``).
Requests are bounded: GET and HEAD only, a socket timeout per connection, at most
:data:`MAX_CONNECTIONS` at once (more are closed unanswered), daemon threads, nothing read from a
request body. Bodies name checks, destinations and counts, never patient identity. A port that
cannot be opened is logged and the service runs on without the endpoint: reception never depends
on monitoring.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from dicom_ai.config import Settings
from dicom_ai.service.association import error_site
from dicom_ai.service.metrics import MAIN_PROCESS_METRICS, FreeBytes, IndexCollector, read_only
from dicom_ai.service.tcp import BoundedThreadingTCPServer

log = logging.getLogger(__name__)

#: Connections served at once; one more is closed at once (a scraper, two probes and a few
#: browser tabs need far fewer).
MAX_CONNECTIONS = 16
#: Seconds a connection may take to send its request, and each write of the answer.
REQUEST_TIMEOUT_S = 10.0
#: The endpoint's own paths.
OWN_PATHS = ("/metrics", "/healthz", "/readyz")


class Reply(Protocol):
    """What a route handler returns (``page.Response`` and :class:`Response` both fit)."""

    @property
    def status(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    @property
    def body(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


#: A mounted route: ``(method, target, headers)`` → reply; ``target`` is the raw request target
#: (path and query), ``method`` is GET or HEAD.
Handler = Callable[[str, str, Mapping[str, str]], Reply]


@dataclass(frozen=True)
class Response:
    """An answer of the endpoint's own routes."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(status: int, document: Mapping[str, Any]) -> Response:
    """A JSON answer."""
    return Response(status, "application/json",
                    json.dumps(document, indent=2).encode() + b"\n")


@dataclass(frozen=True)
class Check:
    """One health check: its name, whether it passes, and an identity-free detail."""

    name: str
    ok: bool
    detail: str

    @property
    def group(self) -> str:
        """The part of the name before ``/`` (``destinations`` for ``destinations/pacs``)."""
        return self.name.split("/", 1)[0]


class ListenerLike(Protocol):
    """What health reads of the DICOM listener."""

    @property
    def accepting(self) -> bool: ...


class ChildLike(Protocol):
    """What health reads of a child process."""

    def is_alive(self) -> bool: ...


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class ServiceHealth:
    """The checks of ``/healthz`` and ``/readyz``.

    Parameters
    ----------
    root:
        ``storage.directory``.
    listener:
        The DICOM listener.
    children:
        Child process by name; read at every check, so a restarted child is seen.
    lock_path:
        The storage lock file the service holds.
    minimum_free_bytes:
        ``storage.minimum_free_mb`` in bytes.
    free_bytes:
        Free-space probe.
    destinations:
        Names of the configured destinations.
    """

    def __init__(self, root: Path, *, listener: ListenerLike, children: Mapping[str, ChildLike],
                 lock_path: Path, minimum_free_bytes: int, free_bytes: FreeBytes,
                 destinations: Sequence[str]) -> None:
        self.root = root
        self.listener = listener
        self.children = children
        self.lock_path = lock_path
        self.minimum_free_bytes = minimum_free_bytes
        self.free_bytes = free_bytes
        self.destinations = list(destinations)

    def liveness(self) -> list[Check]:
        """The process answers (this runs) and the listener accepts connections."""
        return [self._listener()]

    def readiness(self) -> list[Check]:
        """Storage, listener, children, destinations."""
        return [self._storage(), self._listener(), *self._children(), *self._destinations()]

    def _listener(self) -> Check:
        accepting = self.listener.accepting
        return Check("listener", accepting,
                     "accepting associations" if accepting else "not accepting connections")

    def _children(self) -> list[Check]:
        return [Check(name, proc.is_alive(), "running" if proc.is_alive() else "not running")
                for name, proc in sorted(dict(self.children).items())]

    def _storage(self) -> Check:
        problems: list[str] = []
        if not self._holds_lock():
            problems.append(f"{self.lock_path.name} not held by this process")
        probe = self.root / "tmp" / f".readyz-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"readyz\n")
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            problems.append(f"not writable ({exc.strerror})")
        try:
            free = self.free_bytes(self.root)
        except OSError as exc:
            problems.append(f"free space unknown ({exc.strerror})")
        else:
            if free < self.minimum_free_bytes:
                problems.append(f"{_gib(free)} free, below storage.minimum_free_mb "
                                f"({_gib(self.minimum_free_bytes)}): C-STORE is refused")
        if problems:
            return Check("storage", False, "; ".join(problems))
        return Check("storage", True, f"locked, writable, {_gib(free)} free")

    def _holds_lock(self) -> bool:
        """The lock file names this process, and its ``flock`` is held (by our other
        descriptor: a second open file description of the same file conflicts with it)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if os.pread(fd, 32, 0).decode(errors="replace").strip() != str(os.getpid()):
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def _destinations(self) -> list[Check]:
        if not self.destinations:
            return []
        try:
            conn = read_only(self.root / "index.sqlite")
            try:
                rows = {str(r[0]): tuple(int(v or 0) for v in r[1:]) for r in conn.execute(
                    "SELECT destination, SUM(state = 'pending'), "
                    "SUM(state = 'pending' AND attempts > 0), "
                    "SUM(state = 'pending' AND late = 1), SUM(state = 'dead') "
                    "FROM outbound GROUP BY destination")}
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return [Check(f"destinations/{name}", False,
                          f"outbound queue unreadable ({type(exc).__name__})")
                    for name in self.destinations]
        checks = []
        for name in self.destinations:
            pending, retrying, late, dead = rows.get(name, (0, 0, 0, 0))
            if late:
                detail = f"unreachable: {late} deliveries failing past export.late_after_s"
            elif retrying:
                detail = f"failing: {retrying} deliveries retrying"
            else:
                detail = "reachable" if pending == 0 else f"reachable, {pending} pending"
            if dead:
                detail += f"; {dead} dead letters (`dicom-ai retry`)"
            checks.append(Check(f"destinations/{name}", late == 0, detail))
        return checks


class HealthCollector(Collector):
    """``dicom_ai_ready{check}``: each readiness check as 1 (passes) or 0, at scrape time."""

    def __init__(self, health: ServiceHealth) -> None:
        self.health = health

    def collect(self) -> Iterable[Metric]:
        """One gauge family with a sample per check."""
        family = GaugeMetricFamily("dicom_ai_ready", "1 when the readiness check passes",
                                   labels=["check"])
        for check in self.health.readiness():
            family.add_metric([check.name], 1.0 if check.ok else 0.0)
        yield family


def _report(checks: list[Check], exclude: Sequence[str]) -> tuple[int, dict[str, Any]]:
    kept = [c for c in checks if c.name not in exclude and c.group not in exclude]
    failing = [c.name for c in kept if not c.ok]
    document: dict[str, Any] = {
        "status": "ok" if not failing else "failing",
        "failing": failing,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in kept],
    }
    if exclude:
        document["excluded"] = sorted(set(exclude))
    return (200 if not failing else 503), document


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = "dicom-ai"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        self.server.endpoint.handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.endpoint.handle(self, "HEAD")

    def _not_allowed(self) -> None:
        self.server.endpoint.send(self, Response(405, "text/plain; charset=utf-8",
                                                 b"method not allowed\n", {"Allow": "GET, HEAD"}),
                                  head_only=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: a query may carry the page's token.
        log.debug("%s %s → %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class _Server(BoundedThreadingTCPServer):
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], endpoint: HTTPEndpoint) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.endpoint = endpoint
        super().__init__(address, _RequestHandler, max_connections=MAX_CONNECTIONS)

    def server_bind(self) -> None:
        # Not HTTPServer.server_bind: it resolves the host's FQDN, which can wait on DNS for
        # seconds.
        super().server_bind()
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def connection_refused(self, client_address: Any) -> None:
        log.warning("http: connection closed unanswered: %d open", MAX_CONNECTIONS)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http: connection from %s ended with an error", client_address[0])


class HTTPEndpoint:
    """The HTTP server: own routes, mounted routes, one thread per request.

    Parameters
    ----------
    address:
        Bind address and port (0: a free port, see :attr:`address`).
    registry:
        What ``/metrics`` exposes.
    health:
        The checks of ``/healthz`` and ``/readyz``.

    Raises
    ------
    OSError
        The address cannot be bound.
    """

    def __init__(self, address: tuple[str, int], *, registry: CollectorRegistry,
                 health: ServiceHealth) -> None:
        self.registry = registry
        self.health = health
        self._routes: list[tuple[str, Handler]] = []
        self._routes_lock = threading.Lock()
        self._server = _Server(address, self)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def add_route(self, prefix: str, handler: Handler) -> None:
        """Send requests whose path starts with ``prefix`` to ``handler`` (the longest matching
        prefix wins; the endpoint's own paths always come first). Safe while serving."""
        if not prefix.startswith("/"):
            raise ValueError(f"a route prefix starts with '/', got {prefix!r}")
        with self._routes_lock:
            routes = [r for r in self._routes if r[0] != prefix] + [(prefix, handler)]
            self._routes = sorted(routes, key=lambda r: len(r[0]), reverse=True)

    def start(self) -> None:
        """Serve in a background (daemon) thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and close the socket (requests in flight end on their own)."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        """Answer one GET or HEAD."""
        target = request.path
        path = urlsplit(target).path
        try:
            reply = self._reply(method, target, path, request)
        except Exception as exc:
            log.error("http: %s %s failed: %s", method, path, error_site(exc))
            reply = Response(500, "text/plain; charset=utf-8", b"internal error\n")
        self.send(request, reply, head_only=method == "HEAD")

    def _reply(self, method: str, target: str, path: str,
               request: BaseHTTPRequestHandler) -> Reply:
        if path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return Response(200, content_type, encoder(self.registry))
        if path in ("/healthz", "/readyz"):
            exclude = [v for values in parse_qs(urlsplit(target).query).get("exclude", [])
                       for v in values.split(",") if v]
            checks = self.health.liveness() if path == "/healthz" else self.health.readiness()
            status, document = _report(checks, exclude)
            return json_response(status, document)
        with self._routes_lock:
            routes = list(self._routes)
        for prefix, handler in routes:
            if path.startswith(prefix):
                return handler(method, target, dict(request.headers.items()))
        return Response(404, "text/plain; charset=utf-8", b"not found\n")

    @staticmethod
    def send(request: BaseHTTPRequestHandler, reply: Reply, *, head_only: bool) -> None:
        """Write ``reply`` (headers only for HEAD, with the body's Content-Length)."""
        extra = {k: v for k, v in reply.headers.items()
                 if k.lower() not in ("content-type", "content-length")}
        present = {k.lower() for k in extra}
        with contextlib.suppress(OSError):  # the client went away: nobody to tell
            request.send_response(reply.status)
            request.send_header("Content-Type", reply.content_type)
            request.send_header("Content-Length", str(len(reply.body)))
            for key, value in extra.items():
                request.send_header(key, value)
            if "x-content-type-options" not in present:
                request.send_header("X-Content-Type-Options", "nosniff")
            if "cache-control" not in present:
                request.send_header("Cache-Control", "no-store")
            request.end_headers()
            if not head_only:
                request.wfile.write(reply.body)


def build_registry(health: ServiceHealth, index: IndexCollector) -> CollectorRegistry:
    """The registry of ``/metrics``: listener counters, the index, health, and the main process's
    ``process_*`` / ``python_*`` metrics."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in MAIN_PROCESS_METRICS:
        registry.register(collector)
    registry.register(index)
    registry.register(HealthCollector(health))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def start_endpoint(settings: Settings, *, listener: ListenerLike,
                   children: Mapping[str, ChildLike], lock_path: Path,
                   free_bytes: FreeBytes) -> HTTPEndpoint | None:
    """Start the endpoint of ``[http]``; None when it is disabled or its port cannot be opened
    (logged at ERROR: the service runs on without it).

    Parameters
    ----------
    settings:
        All settings (``http``, ``storage``, ``export.destinations``).
    listener:
        The running DICOM listener.
    children:
        The service's child processes by name (the live mapping: restarts are seen).
    lock_path:
        The storage lock file the service holds.
    free_bytes:
        Free-space probe of the spool.
    """
    http = settings.http
    if not http.enabled:
        log.info("HTTP endpoint disabled (http.enabled = false)")
        return None
    root = Path(settings.storage.directory)
    destinations = [d.name for d in settings.export.destinations]
    minimum = settings.storage.minimum_free_mb * 1024 * 1024
    health = ServiceHealth(root, listener=listener, children=children, lock_path=lock_path,
                           minimum_free_bytes=minimum, free_bytes=free_bytes,
                           destinations=destinations)
    index = IndexCollector(root, destinations=destinations, minimum_free_bytes=minimum,
                           free_bytes=free_bytes)
    # A ``*_created`` series per counter only doubles what a scraper stores: Prometheus sees a
    # counter reset by its value dropping.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
    try:
        endpoint = HTTPEndpoint((http.bind_address, http.port),
                                registry=build_registry(health, index), health=health)
    except OSError as exc:
        log.error("HTTP endpoint not started: cannot listen on %s:%d (%s); /metrics, /healthz, "
                  "/readyz and the status page are unavailable", http.bind_address, http.port,
                  exc.strerror or type(exc).__name__)
        return None
    endpoint.start()
    host, port = endpoint.address
    log.info("HTTP endpoint on http://%s:%d (/metrics, /healthz, /readyz)", host, port)
    return endpoint
