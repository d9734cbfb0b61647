"""Verifying the servers a participant talks to over TLS.

A server that fails verification is not "down for a while": retrying cannot
make it trusted, so it is reported at once as `PeerNotTrusted`, in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xaind.sdk.participant import ParticipantError
from xaind.tls import (
    CABundleError,
    ClientCertificateError,
    VerifyingHTTPSPolicy,
    client_tls_options,
    load_client_certificate,
    load_trust_root,
    tls_refusal,
)

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from twisted.internet.ssl import PrivateCertificate

__all__ = [
    "CABundleError",
    "ClientCertificateError",
    "PeerNotTrusted",
    "client_tls_options",
    "https_policy",
    "load_client_certificate",
    "load_trust_root",
    "tls_refusal",
]


class PeerNotTrusted(ParticipantError):
    """The server's certificate does not chain to the CA bundle or does not name its host."""


def https_policy(trust_root: IOpenSSLTrustRoot | None, client_certificate: PrivateCertificate | None = None) -> VerifyingHTTPSPolicy:
    """The HTTPS policy of twisted.web's Agent: trusting only `trust_root` (the platform's CAs when None), showing `client_certificate`."""
    return VerifyingHTTPSPolicy(trust_root, client_certificate)
