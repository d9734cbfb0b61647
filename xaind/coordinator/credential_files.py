"""Files of credentials the operator manages, re-read when they change.

Two such files exist: the enrolment tokens that admit a participant
(`participants.enrolment_tokens_file`, one token a line) and the client
certificates no longer admitted (`participants.revoked_certificates_file`,
one SHA-256 fingerprint a line). `#` starts a comment in both. The operator
adds and revokes entries by editing the file: it is looked at (one `stat`)
at most once per `check_interval` when a rendez-vous or heartbeat asks, and
re-read only when its modification time, size or inode changed, so the
reactor waits for the disk rarely and briefly (the files are small). A file
that cannot be read any more keeps the last good set, said once in the log
until it can be read again.

Only digests are kept: SHA-256 of each token, a certificate's own
fingerprint. A set lookup of a digest does not reveal, by its timing, how
much of a guess matches a real token, and no token is ever held where a log
line or an error body could quote it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from xaind.logs import get_logger

log = get_logger("xaind.coordinator.credential_files")

#: Seconds between two looks at a file.
DEFAULT_CHECK_INTERVAL = 1.0
#: The largest file read (a credential file is small; a huge one is a mistake).
MAX_FILE_BYTES = 16 * 2**20

_FINGERPRINT = re.compile(r"(?:sha256[:=]\s*)?((?:[0-9a-fA-F]{2}:?){32})", re.IGNORECASE)


class CredentialFileError(Exception):
    """A credential file that cannot be used (unreadable, too large, not UTF-8, a line that means nothing)."""


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _entries(text: str) -> list[tuple[int, str]]:
    """The non-empty lines of `text` without their `#` comments, with their line numbers."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append((number, entry))
    return entries


def parse_tokens(text: str) -> frozenset[bytes]:
    """The digests of the enrolment tokens in a file's text: one a line."""
    return frozenset(token_digest(token) for _, token in _entries(text))


def parse_fingerprints(text: str) -> frozenset[bytes]:
    """The SHA-256 fingerprints in a file's text, one a line: 64 hex digits, colons and a `sha256:` prefix allowed.

    This is what `openssl x509 -noout -fingerprint -sha256` prints (after
    its `sha256 Fingerprint=`), so an operator can paste it. A line that is
    no fingerprint is an error: a typo must not leave a certificate admitted.
    """
    fingerprints = set()
    for number, entry in _entries(text):
        entry = entry.split("Fingerprint=", 1)[-1]
        match = _FINGERPRINT.fullmatch(entry)
        if match is None:
            raise CredentialFileError(f"line {number} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        fingerprints.add(bytes.fromhex(match.group(1).replace(":", "")))
    return frozenset(fingerprints)


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def read_digest_file(path: str, parse: Callable[[str], frozenset[bytes]]) -> tuple[tuple[int, int, int], frozenset[bytes]]:
    """The file's signature and its digests; raises `CredentialFileError` saying what is wrong (with the path)."""
    try:
        with open(path, "rb") as file:
            signature = _signature(os.fstat(file.fileno()))
            if signature[1] > MAX_FILE_BYTES:
                raise CredentialFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise CredentialFileError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialFileError(f"{path}: not UTF-8 text") from None
    try:
        return signature, parse(text)
    except CredentialFileError as error:
        raise CredentialFileError(f"{path}: {error}") from None


class DigestFile:
    """The digests in a credential file, kept in step with it."""

    #: What the file holds, for the log ("enrolment tokens").
    what = "credentials"

    def __init__(self, path: str, clock: IReactorTime, check_interval: float = DEFAULT_CHECK_INTERVAL) -> None:
        self.path = path
        self.clock = clock
        self.check_interval = check_interval
        self._signature, self._digests = read_digest_file(path, self.parse)
        self._checked_at = clock.seconds()
        #: Whether the last look failed (said once, until the file is readable again).
        self._failing = False

    @staticmethod
    def parse(text: str) -> frozenset[bytes]:
        raise NotImplementedError

    @classmethod
    def problem(cls, path: str) -> str | None:
        """Why `path` cannot serve as this file at start-up (for a config line), or None."""
        try:
            read_digest_file(path, cls.parse)
        except CredentialFileError as error:
            return str(error).removeprefix(f"{path}: ")
        return None

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, digest: bytes) -> bool:
        """Whether `digest` is listed (as of at most `check_interval` ago)."""
        self._refresh()
        return digest in self._digests

    def _refresh(self) -> None:
        now = self.clock.seconds()
        if now - self._checked_at < self.check_interval:
            return
        self._checked_at = now
        try:
            if _signature(os.stat(self.path)) == self._signature and not self._failing:
                return
            signature, digests = read_digest_file(self.path, self.parse)
        except (OSError, CredentialFileError) as error:
            if not self._failing:
                self._failing = True
                reason = error.strerror if isinstance(error, OSError) else str(error)
                log.warn(
                    "cannot read the {what} ({reason}): keeping the {count} read last",
                    what=self.what,
                    reason=reason,
                    count=len(self._digests),
                )
            return
        if self._failing:
            log.info("{what} readable again", what=self.what)
        self._failing = False
        changed = digests != self._digests
        self._signature, self._digests = signature, digests
        if changed:
            log.info("{what} re-read: {count} listed", what=self.what, count=len(digests))


class EnrolmentTokens(DigestFile):
    """The tokens that admit a participant (`participants.enrolment_tokens_file`)."""

    what = "enrolment tokens"
    parse = staticmethod(parse_tokens)

    def admits(self, token: str | None) -> bool:
        return token is not None and token_digest(token) in self


class RevokedCertificates(DigestFile):
    """Client certificates no longer admitted, by fingerprint (`participants.revoked_certificates_file`)."""

    what = "revoked certificates"
    parse = staticmethod(parse_fingerprints)
