"""The enrolment token file: read at start, re-read when it changes, kept when it becomes unreadable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from xaind.coordinator.enrolment import EnrolmentFileError, EnrolmentTokens, enrolment_file_problem, parse_tokens, token_digest

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
    mine = [event for event in lines if event.get("log_namespace") == "xaind.coordinator.enrolment"]
    warnings = [event for event in mine if "cannot read" in event["log_format"]]
    assert len(warnings) == 1
    assert warnings[0]["count"] == 1
    assert all(ALICE not in repr(event) and BOB not in repr(event) for event in mine)


def test_start_up_problem_of_a_missing_file(tmp_path: Path) -> None:
    problem = enrolment_file_problem(str(tmp_path / "missing"))
    assert problem is not None and "cannot read" in problem
    with pytest.raises(EnrolmentFileError):
        EnrolmentTokens(str(tmp_path / "missing"), Clock())
    (tmp_path / "binary").write_bytes(b"\xff\xfe\n")
    assert enrolment_file_problem(str(tmp_path / "binary")) == "not UTF-8 text"
