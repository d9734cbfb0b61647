"""Who may join: the credentials a rendez-vous must show, and whether they still hold.

With `participants.authentication` on, a rendez-vous needs one of the
credentials the operator chose: an enrolment token listed in a file, a TLS
client certificate that chained to the participants' CA during the
handshake (the listener's `clientCA=`, docs/tls.rst) and is not listed as
revoked, or either. A participant is registered with the credential it
showed; each of its heartbeats checks that credential again, so a revoked
token or certificate drops it within a heartbeat.

The refusal says which credential is missing and where it goes, never what
was shown; the log line the same (tokens are secrets; a certificate's
fingerprint is not, but one line per flood is enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from xaind.coordinator.credential_files import EnrolmentTokens, RevokedCertificates, token_digest


class CredentialKind(Enum):
    ENROLMENT_TOKEN = "enrolment token"
    CLIENT_CERTIFICATE = "client certificate"


@dataclass(frozen=True)
class Credential:
    """What a participant joined with: a token's digest or a certificate's fingerprint."""

    kind: CredentialKind
    digest: bytes


class NotAuthenticated(Exception):
    """A rendez-vous without an acceptable credential.

    `message` is for the participant (what it must show and where), `reason`
    for the operator's log line (what was wrong); neither quotes a credential.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class ParticipantAuthenticator:
    """The credentials a rendez-vous may show; at least one kind is accepted."""

    def __init__(
        self,
        enrolment_tokens: EnrolmentTokens | None = None,
        client_certificates: bool = False,
        revoked_certificates: RevokedCertificates | None = None,
    ) -> None:
        if enrolment_tokens is None and not client_certificates:
            raise ValueError("an authenticator accepts enrolment tokens, client certificates or both")
        self.enrolment_tokens = enrolment_tokens
        self.client_certificates = client_certificates
        self.revoked_certificates = revoked_certificates

    @property
    def accepts_tokens(self) -> bool:
        return self.enrolment_tokens is not None

    def authenticate(self, token: str | None, certificate: bytes | None, token_hint: str) -> Credential:
        """The credential a rendez-vous showed, or `NotAuthenticated`: a usable certificate first, then a token.

        `certificate` is the fingerprint of a certificate the listener
        verified against its client CA; `token_hint` says where a token goes
        on this edge (a header, an argument).
        """
        if self.client_certificates and certificate is not None and not self._revoked(certificate):
            return Credential(CredentialKind.CLIENT_CERTIFICATE, certificate)
        if self.enrolment_tokens is not None and token is not None:
            digest = token_digest(token)
            if digest in self.enrolment_tokens:
                return Credential(CredentialKind.ENROLMENT_TOKEN, digest)
        raise NotAuthenticated(self._needs(token_hint), self._wrong(token, certificate))

    def still_valid(self, credential: Credential) -> bool:
        """Whether `credential` would still be accepted (the files re-read at most once per their interval)."""
        if credential.kind is CredentialKind.CLIENT_CERTIFICATE:
            return self.client_certificates and not self._revoked(credential.digest)
        return self.enrolment_tokens is not None and credential.digest in self.enrolment_tokens

    def _revoked(self, fingerprint: bytes) -> bool:
        return self.revoked_certificates is not None and fingerprint in self.revoked_certificates

    def _needs(self, token_hint: str) -> str:
        needs = []
        if self.enrolment_tokens is not None:
            needs.append(f"a valid enrolment token ({token_hint})")
        if self.client_certificates:
            needs.append("a client certificate from the participants' CA, not revoked")
        return "rendez-vous needs " + " or ".join(needs)

    def _wrong(self, token: str | None, certificate: bytes | None) -> str:
        shown = []
        if self.client_certificates:
            shown.append("no client certificate" if certificate is None else "a revoked client certificate")
        if self.enrolment_tokens is not None:
            shown.append("no enrolment token" if token is None else "an unlisted enrolment token")
        return " and ".join(shown)
