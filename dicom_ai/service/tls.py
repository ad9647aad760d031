"""TLS contexts for the listener and for outbound associations, built from :class:`TLSSettings`.

DICOM over TLS (PS3.15 B.1) is plain TLS on the association's TCP connection; the listener
presents ``certificate``/``private_key`` and, with ``require_client_cert``, accepts only callers
whose certificate chains to ``ca_certificates`` (mutual TLS). Outbound, ``ca_certificates``
verifies the destination and ``certificate``/``private_key`` (if set) identify us to it.
"""

from __future__ import annotations

import ssl

from dicom_ai.config import TLSSettings


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context: our certificate, and the client CA when mutual TLS is required.

    Parameters
    ----------
    tls:
        ``scp.tls``; ``enabled`` must be true (checked by :func:`dicom_ai.config.validate`).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        ctx.load_verify_locations(tls.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """A context for an outbound association: verify the peer, optionally present our certificate.

    Parameters
    ----------
    tls:
        The destination's TLS settings. Without ``ca_certificates`` the system trust store is used.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=tls.ca_certificates or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate:
        ctx.load_cert_chain(tls.certificate, tls.private_key or None)
    return ctx
