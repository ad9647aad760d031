"""The HTTP endpoint over loopback: /metrics, /healthz and /readyz against a real listener, a real
storage lock and real index rows; mounted routes; the bounds on requests; the [http] settings."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage

from dicom_ai.config import DestinationSettings, Settings, SettingsError, load_settings
from dicom_ai.service import db, http
from dicom_ai.service.http import HTTPEndpoint, Response, start_endpoint
from dicom_ai.service.scp import Listener, disk_free_bytes, start_scp
from dicom_ai.service.server import LOCK_NAME, lock_storage
from dicom_ai.service.spool import Spool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


class Child(threading.Thread):
    """A child process's stand-in with the same liveness question: a thread until ``end``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        self.done.wait(30)

    def end(self) -> None:
        self.done.set()
        self.join(5)


@dataclass
class Running:
    endpoint: HTTPEndpoint
    listener: Listener
    spool: Spool
    children: dict[str, Child]
    settings: Settings
    lock: int

    @property
    def url(self) -> str:
        host, port = self.endpoint.address
        return f"http://{host}:{port}"


def get(url: str, *, method: str = "GET",
        headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return rsp.status, dict(rsp.headers.items()), rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, headers, body = get(url)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    settings = Settings()
    settings.scp.port = 0
    settings.http.port = 0
    settings.storage.directory = str(tmp_path / "storage")
    settings.storage.minimum_free_mb = 1
    settings.export.destinations = [DestinationSettings(name="pacs", ae_title="PACS")]
    root = Path(settings.storage.directory)
    lock = lock_storage(root)
    spool = Spool(root)
    listener = start_scp(settings, spool)
    children = {"worker": Child(), "exporter": Child()}
    endpoint = start_endpoint(settings, listener=listener, children=children,
                              lock_path=root / LOCK_NAME, free_bytes=disk_free_bytes)
    assert endpoint is not None
    run = Running(endpoint, listener, spool, children, settings, lock)
    yield run
    endpoint.stop()
    if listener.accepting:
        listener.stop()
    for child in children.values():
        child.end()
    spool.close()
    os.close(lock)


def test_all_ready_answers_200_naming_every_check(running: Running) -> None:
    status, document = get_json(running.url + "/readyz")
    assert status == 200, document
    assert document["status"] == "ok" and document["failing"] == []
    names = [c["name"] for c in document["checks"]]
    assert names == ["storage", "listener", "exporter", "worker", "destinations/pacs"]
    status, document = get_json(running.url + "/healthz")
    assert status == 200 and [c["name"] for c in document["checks"]] == ["listener"]


def test_a_dead_child_makes_the_service_unready_not_unhealthy(running: Running) -> None:
    running.children["worker"].end()
    status, document = get_json(running.url + "/readyz")
    assert status == 503 and document["failing"] == ["worker"]
    status, _ = get_json(running.url + "/healthz")
    assert status == 200
    status, document = get_json(running.url + "/readyz?exclude=worker")
    assert status == 200 and document["excluded"] == ["worker"]


def test_a_stopped_listener_fails_liveness(running: Running) -> None:
    running.listener.stop()
    status, document = get_json(running.url + "/healthz")
    assert status == 503 and document["failing"] == ["listener"]
    status, document = get_json(running.url + "/readyz")
    assert status == 503 and document["failing"] == ["listener"]


def test_a_destination_failing_past_late_after_is_unready(running: Running) -> None:
    conn = db.connect(running.spool.db_path)
    try:
        conn.execute("INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, "
                     "sop_class_uid, path, destination, state, attempts, next_attempt_at, "
                     "created_at) VALUES (1, '1.2', '1.2.1', ?, 'x', 'pacs', 'pending', 1, 0, 0)",
                     (CTImageStorage,))
        # Failing but not late yet: still ready, and the body says so.
        status, document = get_json(running.url + "/readyz")
        assert status == 200
        detail = {c["name"]: c["detail"] for c in document["checks"]}
        assert detail["destinations/pacs"] == "failing: 1 deliveries retrying"
        conn.execute("UPDATE outbound SET late = 1")
        status, document = get_json(running.url + "/readyz")
        assert status == 503 and document["failing"] == ["destinations/pacs"]
        # Excluding the group leaves reception's own readiness.
        status, _ = get_json(running.url + "/readyz?exclude=destinations")
        assert status == 200
    finally:
        conn.close()


def test_storage_checks_lock_writability_and_free_space(running: Running, tmp_path: Path) -> None:
    root = Path(running.settings.storage.directory)
    health = running.endpoint.health
    assert health._storage().ok
    # Below storage.minimum_free_mb the listener refuses C-STOREs: not ready.
    low = http.ServiceHealth(root, listener=running.listener, children={},
                             lock_path=root / LOCK_NAME, minimum_free_bytes=1 << 60,
                             free_bytes=disk_free_bytes, destinations=[])
    check = low._storage()
    assert not check.ok and "below storage.minimum_free_mb" in check.detail
    # A lock file of another directory, held by nobody: not ours.
    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK_NAME).write_text("1\n")
    unlocked = http.ServiceHealth(root, listener=running.listener, children={},
                                  lock_path=other / LOCK_NAME, minimum_free_bytes=0,
                                  free_bytes=disk_free_bytes, destinations=[])
    assert "not held by this process" in unlocked._storage().detail
    # tmp/ replaced by a file: the probe file cannot be written (whoever we run as).
    (root / "tmp").rename(root / "tmp.away")
    (root / "tmp").write_text("")
    try:
        check = health._storage()
        assert not check.ok and "not writable" in check.detail
    finally:
        (root / "tmp").unlink()
        (root / "tmp.away").rename(root / "tmp")


def test_metrics_are_prometheus_text_with_the_readiness_gauge(running: Running) -> None:
    status, headers, body = get(running.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert b"_created" not in body  # no second series per counter
    for name in ("dicom_ai_instances_received", "dicom_ai_associations_open", "dicom_ai_jobs",
                 "dicom_ai_queue_depth", "dicom_ai_spool_free_bytes", "dicom_ai_ready",
                 "dicom_ai_inference_seconds", "dicom_ai_end_to_end_seconds",
                 "dicom_ai_delivery_attempts", "process_resident_memory_bytes"):
        assert name in families, name
    ready = {s.labels["check"]: s.value for s in families["dicom_ai_ready"].samples}
    assert ready == {"storage": 1, "listener": 1, "exporter": 1, "worker": 1,
                     "destinations/pacs": 1}
    status, headers, body = get(running.url + "/metrics",
                                headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_routes_longest_prefix_wins_own_paths_first(running: Running) -> None:
    seen: list[tuple[str, str]] = []

    def page(method: str, target: str, headers: Mapping[str, str]) -> Response:
        seen.append((method, target))
        if target.split("?")[0] != "/":
            return Response(404, "text/plain", b"no such page\n")
        return Response(200, "text/html; charset=utf-8", b"<p>status</p>",
                        {"Content-Security-Policy": "default-src 'none'"})

    def thumbnails(method: str, target: str, headers: Mapping[str, str]) -> Response:
        return Response(200, "image/png", b"\x89PNG" + headers.get("X-Test", "").encode())

    running.endpoint.add_route("/", page)
    running.endpoint.add_route("/thumbnails/", thumbnails)
    status, headers, body = get(running.url + "/?token=abc")
    assert (status, body) == (200, b"<p>status</p>")
    assert headers["Content-Security-Policy"] == "default-src 'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    assert seen == [("GET", "/?token=abc")]
    status, headers, body = get(running.url + "/thumbnails/1.2/3.png", headers={"X-Test": "t"})
    assert (status, headers["Content-Type"], body) == (200, "image/png", b"\x89PNGt")
    assert get(running.url + "/nothing")[0] == 404
    status, _ = get_json(running.url + "/healthz")  # not the page's
    assert status == 200
    # HEAD: the headers of GET, no body.
    status, headers, body = get(running.url + "/", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(b"<p>status</p>")), b"")
    assert seen[-1] == ("HEAD", "/")


def test_methods_other_than_get_and_head_are_refused(running: Running) -> None:
    status, headers, _ = get(running.url + "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_a_failing_handler_is_a_500_without_its_message(running: Running,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def broken(method: str, target: str, headers: Mapping[str, str]) -> Response:
        raise ValueError("PATIENT^NAME")

    running.endpoint.add_route("/broken", broken)
    with caplog.at_level(logging.ERROR, logger="dicom_ai.service.http"):
        status, _, body = get(running.url + "/broken")
    assert (status, body) == (500, b"internal error\n")
    assert "ValueError at test_http.py" in caplog.text
    assert "PATIENT" not in caplog.text


def test_a_route_prefix_must_be_a_path(running: Running) -> None:
    with pytest.raises(ValueError, match="starts with '/'"):
        running.endpoint.add_route("thumbnails", lambda m, t, h: Response(200, "text/plain", b""))


def test_connections_beyond_the_limit_are_closed_unanswered(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    # Idle connections hold their slot until the request timeout: long enough for the check.
    monkeypatch.setattr(http._RequestHandler, "timeout", 20.0)
    host, port = running.endpoint.address
    idle = [socket.create_connection((host, port), timeout=10)
            for _ in range(http.MAX_CONNECTIONS)]
    try:
        deadline = time.monotonic() + 10
        while running.endpoint._server._connections._value > 0:
            assert time.monotonic() < deadline, "the server did not take the connections"
            time.sleep(0.02)
        with socket.create_connection((host, port), timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            try:
                answer = extra.recv(1024)
            except ConnectionResetError:  # closed with the request unread
                answer = b""
        assert answer == b""
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while get(running.url + "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "requests not served again after the idle ones left"
        time.sleep(0.1)


def test_an_idle_connection_is_closed_after_the_request_timeout(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http._RequestHandler, "timeout", 0.5)
    with socket.create_connection(running.endpoint.address, timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(1024) == b""
        assert time.monotonic() - started < 8


def test_a_taken_port_leaves_the_service_without_the_endpoint(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings()
    settings.http.port = running.endpoint.address[1]
    with caplog.at_level(logging.ERROR, logger="dicom_ai.service.http"):
        second = start_endpoint(settings, listener=running.listener, children={},
                                lock_path=Path("unused"), free_bytes=disk_free_bytes)
    assert second is None
    assert "HTTP endpoint not started: cannot listen on 127.0.0.1" in caplog.text


def test_disabled_endpoint_is_not_started(running: Running) -> None:
    settings = Settings()
    settings.http.enabled = False
    assert start_endpoint(settings, listener=running.listener, children={},
                          lock_path=Path("unused"), free_bytes=disk_free_bytes) is None


def test_http_settings_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "dicom-ai.toml"
    path.write_text('[http]\nbind_address = "0.0.0.0"\nport = 9200\ntoken = "s3cret"\n')
    settings = load_settings(path, env={"DICOM_AI_HTTP_PORT": "9300"})
    assert (settings.http.bind_address, settings.http.port, settings.http.token,
            settings.http.enabled) == ("0.0.0.0", 9300, "s3cret", True)
    defaults = load_settings(None, env={})
    assert (defaults.http.bind_address, defaults.http.port, defaults.http.token) == \
        ("127.0.0.1", 9110, "")
    with pytest.raises(SettingsError, match=r"http\.port"):
        load_settings(None, env={"DICOM_AI_HTTP_PORT": "70000"})
    with pytest.raises(SettingsError, match=r"http\.enabled"):
        load_settings(None, env={"DICOM_AI_HTTP_ENABLED": "maybe"})



def healthcheck_command() -> str:
    """The Dockerfile's HEALTHCHECK command, its continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK "))
    return line.split(" CMD ", 1)[1].strip()


def test_the_container_health_check_command_follows_readiness(running: Running) -> None:
    # The command exactly as Docker runs it (/bin/sh -c), with the image's python3 (here: ours).
    command = healthcheck_command().replace("python3 ", f"{sys.executable} ", 1)
    env = {"DICOM_AI_HTTP_PORT": str(running.endpoint.address[1]), "PATH": "/usr/bin:/bin"}
    assert subprocess.run(["/bin/sh", "-c", command], env=env, timeout=30).returncode == 0
    running.children["exporter"].end()
    assert subprocess.run(["/bin/sh", "-c", command], env=env, timeout=30,
                          capture_output=True).returncode == 1


def test_kubernetes_probes_ask_the_endpoint_on_its_port(running: Running) -> None:
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    http_settings = tomllib.loads(configmap["data"]["dicom-ai.toml"])["http"]
    # The kubelet probes the pod's address: the endpoint must listen on all interfaces there.
    assert http_settings["bind_address"] == "0.0.0.0"
    assert ports["http"] == http_settings["port"]
    paths: dict[str, str] = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get_action = container[probe]["httpGet"]
        assert get_action["port"] == "http"
        paths[probe] = get_action["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}
    for path in set(paths.values()):
        assert get(running.url + path)[0] == 200
