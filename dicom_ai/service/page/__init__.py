"""The status web page: ``/`` and ``/thumbnails/<study>/<sop>.png`` of the service's HTTP endpoint.

Read-only: the index is opened read-only per request and nothing is written anywhere. With a
token set (``[http] token``) every request must carry it, as ``Authorization: Bearer <token>`` or
``?token=<token>``, compared in constant time. The page shows UIDs, modalities, times, states,
counts, our models' findings and thumbnails of our Secondary Captures — never patient identity
(:mod:`~dicom_ai.service.page.render`, :mod:`~dicom_ai.service.page.thumbnails`).

:func:`handle` is the whole interface for the HTTP server: it takes the request's method, target
and headers and returns a :class:`Response`; anything not the page's is a 404 the server may
answer with its own routes first.
"""

from __future__ import annotations

import hmac
import re
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from dicom_ai.service.page.render import render_page
from dicom_ai.service.page.thumbnails import InvalidRequestError, NotFoundError, thumbnail_png

#: Sent with every response of the page: nothing but itself may load (no script at all, images
#: only from here and the empty ``data:`` icon, the inline style), it is never framed, cached or
#: named as a referrer.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; "
                               "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

INDEX_NAME = "index.sqlite"
_THUMBNAIL = re.compile(r"/thumbnails/([^/]{1,64})/([^/]{1,64})\.png")


@dataclass(frozen=True)
class Response:
    """What to answer: status, ``Content-Type``, body and further headers."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: dict(SECURITY_HEADERS))


def _plain(status: int, message: str, **extra: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", message.encode() + b"\n",
                    {**SECURITY_HEADERS, **extra})


def is_page_path(path: str) -> bool:
    """Whether a request path is the page's (``/`` or under ``/thumbnails/``)."""
    return path == "/" or path.startswith("/thumbnails/")


def authorized(token: str | None, headers: Mapping[str, str], query_token: str | None) -> bool:
    """Whether the request may see the page.

    Parameters
    ----------
    token:
        The configured token; ``None`` or empty: no token needed.
    headers:
        Request headers (names in any case).
    query_token:
        The ``token`` query parameter, if any.
    """
    if not token:
        return True
    expected = token.encode()
    offered = [query_token] if query_token is not None else []
    for name, value in headers.items():
        if name.lower() == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                offered.append(credentials.strip())
    # Every offered value is compared, each in constant time, so the answer's timing does not
    # depend on which one (if any) matched.
    return sum(hmac.compare_digest(o.encode(), expected) for o in offered) > 0


def open_index(root: Path) -> sqlite3.Connection:
    """The index opened read-only (``mode=ro``, ``query_only``).

    Raises
    ------
    sqlite3.OperationalError
        When there is no index (yet).
    """
    conn = sqlite3.connect(f"{(root / INDEX_NAME).resolve().as_uri()}?mode=ro", uri=True,
                           timeout=5.0)
    conn.execute("PRAGMA query_only=1")
    return conn


def handle(root: Path, method: str, target: str, headers: Mapping[str, str], *,
           token: str | None = None) -> Response:
    """Answer one request for the page.

    Parameters
    ----------
    root:
        ``storage.directory``.
    method:
        The request method; the page answers ``GET`` and ``HEAD`` (the server drops the body
        of a ``HEAD``).
    target:
        The request target as received (path and query).
    headers:
        Request headers.
    token:
        ``[http] token``; ``None`` or empty: no token needed.

    Returns
    -------
    Response
        200 with the page or a PNG; 400 for a thumbnail not named by UIDs; 401 without the
        token; 404 for anything else; 405 for another method; 503 while there is no index.
    """
    parts = urlsplit(target)
    path = parts.path
    if not is_page_path(path):
        return _plain(404, "not found")
    if method not in ("GET", "HEAD"):
        return _plain(405, "method not allowed", Allow="GET, HEAD")
    query_tokens = parse_qs(parts.query, keep_blank_values=True).get("token")
    query_token = query_tokens[0] if query_tokens else None
    if not authorized(token, headers, query_token):
        return _plain(401, "token required", **{"WWW-Authenticate": 'Bearer realm="dicom-ai"'})
    link_token = query_token if token else None
    if path == "/":
        try:
            conn = open_index(root)
        except sqlite3.OperationalError:
            return _plain(503, "no index yet: the service has not started in this directory")
        try:
            body = render_page(conn, root, token=link_token)
        finally:
            conn.close()
        return Response(200, "text/html; charset=utf-8", body)
    match = _THUMBNAIL.fullmatch(path)
    if match is None:
        return _plain(404, "not found")
    try:
        png = thumbnail_png(root / "outputs", match.group(1), match.group(2))
    except InvalidRequestError:
        return _plain(400, "a thumbnail is named by a Study and a SOP Instance UID")
    except NotFoundError:
        return _plain(404, "no such Secondary Capture")
    return Response(200, "image/png", png)


def handler(root: Path, *, token: str | None = None
            ) -> Callable[[str, str, Mapping[str, str]], Response]:
    """:func:`handle` for one storage directory and token, as the HTTP endpoint calls a route:
    ``(method, target, headers) -> Response``."""

    def serve(method: str, target: str, headers: Mapping[str, str]) -> Response:
        return handle(root, method, target, headers, token=token)

    return serve


__all__ = ["SECURITY_HEADERS", "Response", "authorized", "handle", "handler", "is_page_path",
           "open_index", "render_page", "thumbnail_png"]
