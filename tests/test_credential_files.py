"""Credential files (enrolment tokens, revoked certificates): read at start, re-read when they change, kept when unreadable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from xaind.coordinator.credential_files import CredentialFileError, EnrolmentTokens, RevokedCertificates, parse_fingerprints, parse_tokens, token_digest

ALICE = "3f1c0a6e9b2d4c8e7a5f1b3d9c0e2a4f"
BOB = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"


def write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    # A modification time of its own, even within the file system's timestamp resolution.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))


def test_tokens_comments_and_blank_lines(tmp_path: Path) -> None:
    assert parse_tokens(f"# operators' tokens\n\n{ALICE}  # site A\n  {BOB}\n#{'c' * 32}\n") == frozenset({token_digest(ALICE), token_digest(BOB)})


def test_admits_listed_tokens_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, f"{ALICE}\n", 1)
    tokens = EnrolmentTokens(str(path), Clock())
    assert (tokens.admits(ALICE), tokens.admits(BOB), tokens.admits(None), tokens.admits(""), len(tokens)) == (True, False, False, False, 1)


def test_added_and_revoked_without_restart_after_the_check_interval(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, f"{ALICE}\n", 1)
    clock = Clock()
    tokens = EnrolmentTokens(str(path), clock, check_interval=1.0)
    write(path, f"{BOB}\n", 2)
    # Within the interval the file is not looked at.
    clock.advance(0.5)
    assert (tokens.admits(ALICE), tokens.admits(BOB)) == (True, False)
    clock.advance(0.5)
    assert (tokens.admits(ALICE), tokens.admits(BOB)) == (False, True)


def test_unreadable_file_keeps_the_last_good_set_and_logs_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, f"{ALICE}\n", 1)
    clock = Clock()
    tokens = EnrolmentTokens(str(path), clock, check_interval=1.0)
    lines: list[dict] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        path.unlink()
        for _ in range(3):
            clock.advance(1.0)
            assert tokens.admits(ALICE) is True
        write(path, f"{BOB}\n", 3)
        clock.advance(1.0)
        assert (tokens.admits(ALICE), tokens.admits(BOB)) == (False, True)
    finally:
        globalLogPublisher.removeObserver(lines.append)
    mine = [event for event in lines if event.get("log_namespace") == "xaind.coordinator.credential_files"]
    warnings = [event for event in mine if "cannot read" in event["log_format"]]
    assert len(warnings) == 1
    assert warnings[0]["count"] == 1
    assert all(ALICE not in repr(event) and BOB not in repr(event) for event in mine)


def test_start_up_problem_of_a_missing_file(tmp_path: Path) -> None:
    problem = EnrolmentTokens.problem(str(tmp_path / "missing"))
    assert problem is not None and "cannot read" in problem
    with pytest.raises(CredentialFileError):
        EnrolmentTokens(str(tmp_path / "missing"), Clock())
    (tmp_path / "binary").write_bytes(b"\xff\xfe\n")
    assert EnrolmentTokens.problem(str(tmp_path / "binary")) == "not UTF-8 text"


FINGERPRINT = bytes(range(32))


@pytest.mark.parametrize(
    "line",
    [
        FINGERPRINT.hex(),
        FINGERPRINT.hex().upper(),
        ":".join(f"{byte:02X}" for byte in FINGERPRINT),
        "sha256 Fingerprint=" + ":".join(f"{byte:02X}" for byte in FINGERPRINT),
        "sha256:" + FINGERPRINT.hex() + "  # participant 7, lost laptop",
    ],
    ids=["hex", "upper", "colons", "openssl-output", "prefixed-with-comment"],
)
def test_fingerprints_in_the_forms_operators_paste(line: str) -> None:
    assert parse_fingerprints(f"# revoked\n\n{line}\n") == frozenset({FINGERPRINT})


@pytest.mark.parametrize("line", ["abc", FINGERPRINT.hex()[:-2], FINGERPRINT.hex() + "00", "zz" * 32], ids=["short", "31-bytes", "33-bytes", "not-hex"])
def test_a_line_that_is_no_fingerprint_is_an_error_naming_its_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "revoked"
    path.write_text(f"{FINGERPRINT.hex()}\n{line}\n")
    assert RevokedCertificates.problem(str(path)) == "line 2 is not a SHA-256 fingerprint (64 hex digits, colons allowed)"


def test_revoked_certificates_are_re_read_and_a_broken_edit_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    write(path, "", 1)
    clock = Clock()
    revoked = RevokedCertificates(str(path), clock, check_interval=1.0)
    assert FINGERPRINT not in revoked
    write(path, f"{FINGERPRINT.hex()}\n", 2)
    clock.advance(1.0)
    assert FINGERPRINT in revoked
    write(path, f"{FINGERPRINT.hex()}\nnot a fingerprint\n", 3)
    clock.advance(1.0)
    assert FINGERPRINT in revoked and len(revoked) == 1
