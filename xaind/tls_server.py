"""`xaind-tls:` listeners: Twisted's `ssl:` server endpoint plus an optional client CA.

Twisted's `ssl:` server endpoint never asks a client for a certificate.
`xaind-tls:` takes the same arguments (PORT, `interface`, `backlog`,
`privateKey`, `certKey`, `extraCertChain`) and `clientCA=PATH`, a PEM
bundle: a client may then present a certificate, which must chain to one of
them or the handshake is refused; with `requireClientCertificate=yes` a
client without one is refused too. What a verified certificate entitles a
participant to is for participant authentication to decide (docs/tls.rst);
without `clientCA` it is `ssl:` under another name.

    xaind-tls:8443:interface=0.0.0.0:privateKey=server.key:certKey=server.pem:clientCA=participants-ca.pem
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.filepath import FilePath

from xaind.config import endpoint_arguments
from xaind.tls import CABundleError, pem_certificates

PREFIX = "xaind-tls"


def _certificates(path: str, what: str) -> list[Any]:
    """The OpenSSL certificates of the PEM bundle at `path` (at least one)."""
    content = FilePath(path).getContent()
    found = [certificate.original for certificate in pem_certificates(content)]
    if not found:
        raise CABundleError(f"{what} {path} holds no PEM certificate")
    return found


def endpoint_flag(value: str, name: str) -> bool:
    """A yes/no option of an endpoint string (`requireClientCertificate=yes`, `reusePort=no`)."""
    if value.lower() in ("yes", "true", "1"):
        return True
    if value.lower() in ("no", "false", "0"):
        return False
    raise ValueError(f"{name} must be yes or no, got {value!r}")


def tls_server_endpoint(
    reactor: Any,
    port: str,
    privateKey: str = "server.pem",  # noqa: N803 - the names of Twisted's ssl: endpoint
    certKey: str | None = None,  # noqa: N803
    interface: str = "",
    backlog: str = "50",
    extraCertChain: str | None = None,  # noqa: N803
    clientCA: str | None = None,  # noqa: N803
    requireClientCertificate: str = "no",  # noqa: N803
) -> IStreamServerEndpoint:
    """The endpoint an `xaind-tls:` string describes; every file is read now (errors at start-up)."""
    require = endpoint_flag(requireClientCertificate, "requireClientCertificate")
    if require and clientCA is None:
        raise ValueError("requireClientCertificate=yes needs clientCA")
    certificate_pem = FilePath(certKey or privateKey).getContent()
    key_pem = FilePath(privateKey).getContent()
    private = ssl.PrivateCertificate.loadPEM(certificate_pem + b"\n" + key_pem)
    chain = _certificates(extraCertChain, "extraCertChain") if extraCertChain is not None else None
    client_cas = _certificates(clientCA, "clientCA") if clientCA is not None else None
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=chain,
        verify=client_cas is not None,
        caCerts=client_cas,
        requireCertificate=require,
    )
    return endpoints.SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


def verifies_client_certificates(description: str) -> bool:
    """Whether the listener `description` asks clients for a certificate and verifies it (`xaind-tls:` with `clientCA=`).

    Only there is a peer certificate one that chains to the operator's CA:
    `ssl:` never asks for one.
    """
    kind, _, named = endpoint_arguments(description)
    return kind == PREFIX and "clientCA" in named


def peer_certificate_fingerprint(transport: Any) -> bytes | None:
    """The SHA-256 fingerprint of the certificate the peer of `transport` presented, if any.

    A TLS transport (or a wrapper that passes attributes on, as Twisted's
    protocol wrappers do) has `getPeerCertificate`; a plain TCP one does not.
    """
    get_certificate = getattr(transport, "getPeerCertificate", None)
    if get_certificate is None:
        return None
    try:
        certificate = get_certificate()
    except SSL.Error:
        return None
    if certificate is None:
        return None
    return bytes.fromhex(certificate.digest("sha256").decode("ascii").replace(":", ""))
