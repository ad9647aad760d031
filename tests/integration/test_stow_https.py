"""STOW-RS over HTTPS to a real DICOMweb server: server verification against our CA, refusal of
an untrusted server, and mutual TLS.

Orthanc (with its DICOMweb plugin) is the server. Its own HTTPS cannot be used on this platform:
Orthanc 1.10.1's embedded web server crashes (segfault in a civetweb worker) on the first TLS
connection with the distribution's OpenSSL 3. TLS is therefore terminated in front of it, as a
hospital reverse proxy would, by an OpenSSL server (Python's ``asyncio``/``ssl``) relaying the
bytes to Orthanc's plain HTTP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STUDY_UID, MakeDicom
from orthanc import DICOMWEB_PLUGIN, Orthanc, orthanc_available, start_orthanc

from dicom_ai.config import DestinationSettings, TLSSettings
from dicom_ai.service.export import Delivery, StowSender

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (orthanc_available() and DICOMWEB_PLUGIN.exists()),
                       reason="needs Orthanc and its DICOMweb plugin (apt: orthanc "
                              "orthanc-dicomweb)"),
]


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.contextmanager
def tls_front(pacs: Orthanc, certs: Path, *, require_client_cert: bool) -> Iterator[str]:
    """An HTTPS endpoint relaying to Orthanc's HTTP port; yields the DICOMweb base URL.

    asyncio's TLS (one event loop thread, OpenSSL memory BIOs) relays both directions of each
    connection without sharing an SSL object between threads.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    if require_client_cert:
        context.load_verify_locations(certs / "ca.crt")
        context.verify_mode = ssl.CERT_REQUIRED

    async def connection(client_reader: asyncio.StreamReader,
                         client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", pacs.http_port)
        await asyncio.gather(_relay(client_reader, upstream_writer),
                             _relay(upstream_reader, client_writer))

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        asyncio.start_server(connection, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    async def shut_down() -> None:
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        # Waited for here, so none is left pending when the loop closes: a pending task is
        # destroyed later, in whatever test runs then, and logs a traceback into its caplog.
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/dicom-web"
    finally:
        asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def delivery(make_dicom: MakeDicom, sop: str) -> Delivery:
    path = make_dicom(f"{sop}.dcm", SOPInstanceUID=sop)
    return Delivery(1, path, sop, "1.2.840.10008.5.1.4.1.1.7", "pacs", 0)


def sender(url: str, tls: TLSSettings) -> StowSender:
    return StowSender(DestinationSettings(name="pacs", kind="stow", url=url, tls=tls))


def test_stow_over_https_verifies_the_server(tmp_path: Path, certs: Path,
                                             make_dicom: MakeDicom) -> None:
    with start_orthanc(tmp_path / "orthanc") as pacs, \
            tls_front(pacs, certs, require_client_cert=False) as url:
        trusted = TLSSettings(enabled=True, ca_certificates=str(certs / "ca.crt"))
        assert sender(url, trusted).send([delivery(make_dicom, "1.2.3.300")]) == {1: None}
        assert pacs.study_id(STUDY_UID) is not None
        # The system trust store does not know our test CA: the server is not trusted.
        (reason,) = sender(url, TLSSettings(enabled=True)).send(
            [delivery(make_dicom, "1.2.3.301")]).values()
        assert reason is not None and "SSLError" in reason
        assert len(pacs.get(f"/studies/{pacs.study_id(STUDY_UID)}/instances")) == 1


def test_stow_with_mutual_tls(tmp_path: Path, certs: Path, make_dicom: MakeDicom) -> None:
    with start_orthanc(tmp_path / "orthanc") as pacs, \
            tls_front(pacs, certs, require_client_cert=True) as url:
        anonymous = TLSSettings(enabled=True, ca_certificates=str(certs / "ca.crt"))
        (reason,) = sender(url, anonymous).send([delivery(make_dicom, "1.2.3.302")]).values()
        assert reason is not None and "STOW-RS failed" in reason
        assert pacs.study_id(STUDY_UID) is None
        identified = TLSSettings(enabled=True, ca_certificates=str(certs / "ca.crt"),
                                 certificate=str(certs / "client.crt"),
                                 private_key=str(certs / "client.key"))
        assert sender(url, identified).send([delivery(make_dicom, "1.2.3.303")]) == {1: None}
        assert pacs.study_id(STUDY_UID) is not None
