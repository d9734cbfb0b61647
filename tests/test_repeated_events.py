"""xaind.logs.RepeatedEventLog: a flood of one kind of event is one line, then one line with a count per interval.

100,000 fake participants expiring wrote 100,000 log lines (and stalled the
reactor while they were written). Timing runs on a `Clock`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from xaind.logs import RepeatedEventLog, get_logger

log = get_logger("xaind.tests.repeated")


@pytest.fixture
def lines() -> Iterator[list[str]]:
    seen: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "xaind.tests.repeated":
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_the_first_event_is_logged_at_once_and_the_repeats_as_one_line_with_their_count(lines: list[str]) -> None:
    clock = Clock()
    events = RepeatedEventLog(log, clock, interval=10.0)
    for number in range(100_000):
        events.emit("expired", LogLevel.info, "no heartbeat from {participant}", participant=f"p{number}")
    assert lines == ["no heartbeat from p0"]
    clock.advance(10.0)
    assert lines == ["no heartbeat from p0", "no heartbeat from p99999 (and 99999 more like it in the last 10 s)"]
    clock.advance(10.0)
    assert len(lines) == 2  # nothing more happened: nothing more said
    events.emit("expired", LogLevel.info, "no heartbeat from {participant}", participant="late")
    assert lines[-1] == "no heartbeat from late"


def test_a_lasting_flood_is_one_line_per_interval(lines: list[str]) -> None:
    clock = Clock()
    events = RepeatedEventLog(log, clock, interval=5.0)
    for _ in range(60):  # one minute, 100 events a second
        for _ in range(100):
            events.emit("refused", LogLevel.warn, "refused a rendez-vous from {address}", address="192.0.2.1")
        clock.advance(1.0)
    assert len(lines) == 1 + 12
    assert lines[1] == "refused a rendez-vous from 192.0.2.1 (and 499 more like it in the last 5 s)"
    assert lines[2] == "refused a rendez-vous from 192.0.2.1 (and 500 more like it in the last 5 s)"


def test_kinds_are_counted_apart(lines: list[str]) -> None:
    clock = Clock()
    events = RepeatedEventLog(log, clock, interval=1.0)
    for _ in range(3):
        events.emit("a", LogLevel.info, "a {n}", n=1)
        events.emit("b", LogLevel.info, "b {n}", n=2)
    clock.advance(1.0)
    assert sorted(lines) == sorted(["a 1", "b 2", "a 1 (and 2 more like it in the last 1 s)", "b 2 (and 2 more like it in the last 1 s)"])


def test_stop_says_what_is_still_counted_and_leaves_no_timer(lines: list[str]) -> None:
    clock = Clock()
    events = RepeatedEventLog(log, clock, interval=30.0)
    events.emit("x", LogLevel.info, "x")
    events.emit("x", LogLevel.info, "x")
    events.stop()
    assert lines == ["x", "x (and 1 more like it in the last 30 s)"]
    assert clock.getDelayedCalls() == []


def test_an_event_alone_leaves_no_timer_and_a_later_one_is_logged_at_once(lines: list[str]) -> None:
    clock = Clock()
    events = RepeatedEventLog(log, clock, interval=10.0)
    events.emit("x", LogLevel.info, "x {n}", n=1)
    assert clock.getDelayedCalls() == []  # a site that is never stopped keeps nothing scheduled
    clock.advance(10.0)
    events.emit("x", LogLevel.info, "x {n}", n=2)
    assert lines == ["x 1", "x 2"]
