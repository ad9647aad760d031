"""OHIF's prebuilt ``dist/`` and Orthanc's DICOMweb on one origin, for the browser tests.

OHIF is a single-page app: a path that is not a file (``/viewer?...``) gets ``index.html``.
``/app-config.js`` is the test's own configuration; ``/dicom-web/...`` is forwarded to Orthanc,
so the browser never makes a cross-origin request (no CORS set-up in Orthanc). Binds 127.0.0.1.
"""

from __future__ import annotations

import http.client
import mimetypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: Request headers passed on to Orthanc; with ``Host`` its DICOMweb plugin writes URLs
#: (Retrieve URL, BulkDataURI) that point back at this proxy.
_FORWARDED_REQUEST_HEADERS = ("Accept", "Range", "Host")
#: Response headers passed back from Orthanc; the body is re-framed with its own length.
_FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Content-Range", "ETag")


def app_config(dicomweb_root: str = "/dicom-web") -> str:
    """``window.config`` for OHIF with one DICOMweb data source at ``dicomweb_root``.

    Parameters
    ----------
    dicomweb_root:
        Path of the DICOMweb service on the viewer's own origin.

    Returns
    -------
    str
        The JavaScript of ``app-config.js``.
    """
    # Orthanc's plugin answers QIDO with includefield and builds full metadata per series;
    # bulkdata URIs it returns are absolute to Orthanc, so OHIF must not follow them
    # (bulkDataURI disabled: pixel data comes from the frames endpoint through this proxy).
    return f"""window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'Orthanc (dicom-ai test)',
        name: 'orthanc',
        wadoUriRoot: '{dicomweb_root}',
        qidoRoot: '{dicomweb_root}',
        wadoRoot: '{dicomweb_root}',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {{ enabled: false }},
      }},
    }},
  ],
}};
"""


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/dicom-web/") or path == "/dicom-web":
            self._forward()
        elif path == "/app-config.js":
            self._send(200, "text/javascript", self.server.config_js.encode())
        else:
            self._static(unquote(path))

    def _static(self, path: str) -> None:
        dist = self.server.dist
        target = (dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(dist) or not target.is_file():
            target = dist / "index.html"
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, content_type, target.read_bytes())

    def _forward(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=60)
        try:
            headers = {k: v for k in _FORWARDED_REQUEST_HEADERS if (v := self.headers.get(k))}
            conn.request("GET", self.path, headers=headers)
            rsp = conn.getresponse()
            body = rsp.read()
        finally:
            conn.close()
        self.send_response(rsp.status)
        for name in _FORWARDED_RESPONSE_HEADERS:
            if value := rsp.getheader(name):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # One origin for everything: cross-origin isolation lets OHIF use SharedArrayBuffer.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Requests are many (one per frame); failures show up in the browser's own log.
        pass


class ViewerServer(ThreadingHTTPServer):
    """The HTTP server: ``dist`` served, ``/dicom-web`` forwarded to Orthanc's HTTP port."""

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.config_js = app_config()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serve_viewer(dist: Path, orthanc_port: int) -> Iterator[ViewerServer]:
    """Serve OHIF's ``dist`` with ``/dicom-web`` forwarded to Orthanc; stopped on exit.

    Parameters
    ----------
    dist:
        The ``dist`` folder of the ``@ohif/app`` package.
    orthanc_port:
        Orthanc's HTTP port on 127.0.0.1 (its DICOMweb plugin at ``/dicom-web``).
    """
    server = ViewerServer(dist, orthanc_port)
    thread = threading.Thread(target=server.serve_forever, name="ohif-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
