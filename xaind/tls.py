"""TLS clients that verify their server: against an operator's CA bundle, by host name.

The operator hands out one CA bundle (a PEM file of one or more
certificates); a server is trusted only if its certificate chains to one of
them and names the host the client connected to (service-identity). Used by
the participants (xaind.sdk) and by the aggregator's PB link.

A client may also present a certificate of its own, for servers that ask
for one (`xaind-tls:` listeners with `clientCA=`, xaind/tls_server.py):
participants authenticate with it, and the aggregator's link may need one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from twisted.internet import ssl
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.spread import pb

from xaind.no_delay import NoDelayBroker

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class CABundleError(ValueError):
    """A CA bundle that cannot be used: missing, unreadable, or without a certificate."""


def pem_certificates(content: bytes) -> list[ssl.Certificate]:
    """Every certificate of a PEM bundle's bytes, in order (SSL.Error for one that cannot be read)."""
    return [ssl.Certificate.loadPEM(match) for match in _PEM_CERTIFICATE.findall(content)]


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """The certificates of the PEM bundle at `path` as a trust root (only they are trusted)."""
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except OSError as error:
        raise CABundleError(f"CA bundle {path} cannot be read ({error.strerror})") from None
    try:
        certificates = pem_certificates(content)
    except SSL.Error as error:
        raise CABundleError(f"CA bundle {path} holds a certificate that cannot be read ({error})") from None
    if not certificates:
        raise CABundleError(f"CA bundle {path} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


class ClientCertificateError(ValueError):
    """A client certificate or key that cannot be used: unreadable, not PEM, or not a matching pair."""


def _read_pem(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise ClientCertificateError(f"{path} cannot be read ({error.strerror})") from None


def load_client_certificate(certificate_path: str, key_path: str | None = None) -> ssl.PrivateCertificate:
    """The certificate at `certificate_path` with its private key (in the same PEM file, or at `key_path`).

    The pair is checked now, so a key that does not belong to the
    certificate is one line at start-up, not a handshake failure later.
    """
    certificate_pem = _read_pem(certificate_path)
    key_pem = certificate_pem if key_path is None else _read_pem(key_path)
    if not _PEM_CERTIFICATE.search(certificate_pem):
        raise ClientCertificateError(f"{certificate_path} holds no PEM certificate")
    try:
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except (crypto.Error, SSL.Error, ValueError, TypeError):
        raise ClientCertificateError(f"{key_path or certificate_path} holds no usable PEM private key") from None
    try:
        # Twisted checks that the key is the certificate's (VerifyError).
        certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(ssl.Certificate.loadPEM(certificate_pem), key)
    except VerifyError:
        raise ClientCertificateError(f"the private key in {key_path or certificate_path} does not belong to the certificate in {certificate_path}") from None
    except (crypto.Error, SSL.Error, ValueError, TypeError):
        raise ClientCertificateError(f"{certificate_path} holds no usable PEM certificate") from None
    return certificate


def client_tls_options(
    hostname: str, trust_root: IOpenSSLTrustRoot | None, client_certificate: ssl.PrivateCertificate | None = None
) -> IOpenSSLClientConnectionCreator:
    """TLS for a connection to `hostname`, verified against `trust_root` (the platform's CAs when None).

    `client_certificate` is presented when the server asks for one.
    """
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root, clientCertificate=client_certificate)


@implementer(IPolicyForHTTPS)
class VerifyingHTTPSPolicy:
    """twisted.web's Agent policy: `client_tls_options` for each host (Twisted's own cannot present a certificate)."""

    def __init__(self, trust_root: IOpenSSLTrustRoot | None, client_certificate: ssl.PrivateCertificate | None = None) -> None:
        self.trust_root = trust_root
        self.client_certificate = client_certificate

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:  # noqa: N802 - Twisted's name
        return client_tls_options(hostname.decode("ascii"), self.trust_root, self.client_certificate)


def tls_refusal(reason: Any) -> str | None:
    """What a TLS handshake refused in `reason` (a Failure, an exception, or one wrapping others), if it did.

    Twisted wraps the handshake's `SSL.Error` in its own errors (the Agent's
    `ResponseNeverReceived` lists the reasons; a PB connection lost says why
    in its first argument), so they are searched, a bounded depth deep.
    """
    pending: list[tuple[Any, int]] = [(reason, 0)]
    while pending:
        current, depth = pending.pop()
        if depth > 4:
            continue
        if isinstance(current, Failure):
            current = current.value
        if isinstance(current, SSL.Error):
            return _describe_ssl_error(current)
        if isinstance(current, (VerificationError, CertificateError)):
            return f"certificate does not name the host ({_describe_identity_error(current)})"
        if isinstance(current, BaseException):
            nested = list(getattr(current, "reasons", None) or []) + list(current.args)
            pending.extend((item, depth + 1) for item in nested if isinstance(item, (Failure, BaseException)))
    return None


def _describe_ssl_error(error: SSL.Error) -> str:
    """OpenSSL's reasons in one line, e.g. "certificate verify failed"."""
    reasons: list[str] = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return ", ".join(reason for reason in reasons if reason) or str(error) or type(error).__name__


def _describe_identity_error(error: Exception) -> str:
    mismatches = getattr(error, "errors", None)
    if mismatches:
        return "; ".join(str(mismatch) for mismatch in mismatches)
    return str(error) or type(error).__name__



class _LossReportingBroker(NoDelayBroker):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.clientConnectionLost(None, reason)


class LossReportingPBClientFactory(pb.PBClientFactory):
    """A PB client factory whose pending logins fail when their connection is lost, with its reason.

    A PB connection is ready only once both ends agreed on a dialect, after
    the TLS handshake; a connection refused by the handshake is lost before
    that. Connected through an endpoint, PBClientFactory is never told, so a
    login would wait forever; here it fails with the handshake's reason.
    """

    protocol = _LossReportingBroker
