"""Participants' enrolment tokens: a file the operator manages, re-read when it changes.

With `participants.authentication: enrolment_tokens` a rendez-vous needs
one of the tokens in `participants.enrolment_tokens_file` (one per line,
`#` starts a comment). The operator adds and revokes tokens by editing the
file: it is looked at (one `stat`) at most once per `check_interval` on a
rendez-vous or heartbeat, and re-read only when its modification time, size
or inode changed, so the reactor waits for the disk rarely and briefly (the
file is small). A file that cannot be read any more keeps the last good set,
said once in the log until it can be read again.

Only SHA-256 digests of the tokens are kept: a set lookup of a digest does
not reveal, by its timing, how much of a guess matches a real token, and no
token is ever held where a log line or an error body could quote it.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.interfaces import IReactorTime

from xaind.logs import get_logger

log = get_logger("xaind.coordinator.enrolment")

#: Seconds between two looks at the token file.
DEFAULT_CHECK_INTERVAL = 1.0
#: The largest token file read (a token file is small; a huge one is a mistake).
MAX_FILE_BYTES = 16 * 2**20


class EnrolmentFileError(Exception):
    """The token file cannot be used (unreadable, too large, not UTF-8)."""


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str) -> frozenset[bytes]:
    """The digests of the tokens in a file's text: one a line, blank lines and `#` comments ignored."""
    digests = set()
    for line in text.splitlines():
        token = line.split("#", 1)[0].strip()
        if token:
            digests.add(token_digest(token))
    return frozenset(digests)


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def read_token_file(path: str) -> tuple[tuple[int, int, int], frozenset[bytes]]:
    """The file's signature and its tokens' digests; raises `EnrolmentFileError`."""
    try:
        with open(path, "rb") as file:
            signature = _signature(os.fstat(file.fileno()))
            if signature[1] > MAX_FILE_BYTES:
                raise EnrolmentFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise EnrolmentFileError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EnrolmentFileError(f"{path}: not UTF-8 text") from None
    return signature, parse_tokens(text)


def enrolment_file_problem(path: str) -> str | None:
    """Why `path` cannot serve as the token file at start-up (a config line), or None."""
    try:
        read_token_file(path)
    except EnrolmentFileError as error:
        return str(error).removeprefix(f"{path}: ")
    return None


class EnrolmentTokens:
    """The tokens that admit a participant, kept in step with their file."""

    def __init__(self, path: str, clock: IReactorTime, check_interval: float = DEFAULT_CHECK_INTERVAL) -> None:
        self.path = path
        self.clock = clock
        self.check_interval = check_interval
        self._signature, self._digests = read_token_file(path)
        self._checked_at = clock.seconds()
        #: Whether the last look failed (said once, until the file is readable again).
        self._failing = False

    def __len__(self) -> int:
        return len(self._digests)

    def admits(self, token: str | None) -> bool:
        """Whether `token` is one of the file's tokens (as of at most `check_interval` ago)."""
        return token is not None and self.admits_digest(token_digest(token))

    def admits_digest(self, digest: bytes) -> bool:
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
            signature, digests = read_token_file(self.path)
        except (OSError, EnrolmentFileError) as error:
            if not self._failing:
                self._failing = True
                reason = error.strerror if isinstance(error, OSError) else str(error)
                log.warn(
                    "cannot read the enrolment tokens ({reason}): keeping the {count} token(s) read last",
                    reason=reason,
                    count=len(self._digests),
                )
            return
        if self._failing:
            log.info("enrolment tokens readable again")
        self._failing = False
        changed = digests != self._digests
        self._signature, self._digests = signature, digests
        if changed:
            log.info("enrolment tokens re-read: {count} token(s)", count=len(digests))
