"""Logging for xaind's own namespaces, with a level taken from configuration.

twistd owns the global log observers, so the configured level is applied by
routing xaind's loggers through one filtering observer instead of replacing
twistd's: Twisted's own start-up and shutdown lines stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

ROOT_NAMESPACE = "xaind"

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)
_levels.setLogLevelForNamespace(ROOT_NAMESPACE, LogLevel.info)
_observer = FilteringLogObserver(lambda event: globalLogPublisher(event), [_levels])


def get_logger(namespace: str) -> Logger:
    """A logger under the `xaind` namespace whose events obey `set_level`."""
    if namespace != ROOT_NAMESPACE and not namespace.startswith(ROOT_NAMESPACE + "."):
        namespace = f"{ROOT_NAMESPACE}.{namespace}"
    return Logger(namespace=namespace, observer=_observer)


def set_level(level_name: str) -> None:
    """Set the lowest level logged by xaind (`debug`, `info`, `warn`, `error`, `critical`)."""
    _levels.setLogLevelForNamespace(ROOT_NAMESPACE, LogLevel.levelWithName(level_name))


#: Seconds during which further events of a kind are counted instead of logged (`logging.repeat_interval`).
DEFAULT_REPEAT_INTERVAL = 10.0
_repeat_interval = DEFAULT_REPEAT_INTERVAL


def set_repeat_interval(seconds: float) -> None:
    """The interval of every `RepeatedEventLog` made from now on without one of its own (the daemon's configuration)."""
    global _repeat_interval
    _repeat_interval = seconds


@dataclass
class _Repeats:
    kind: str
    level: LogLevel
    format: str
    fields: dict[str, Any]
    #: When the current interval began (its first event was logged, or the previous one ended).
    since: float
    count: int = 0
    #: Armed by the first repeat only: one event alone leaves no timer behind.
    timer: IDelayedCall | None = None


class RepeatedEventLog:
    """One log line for the first event of a kind, then at most one per interval, with a count.

    Some events come by the thousand when a daemon is flooded (participants
    that expire, rendez-vous and connections refused): a line each was
    100,000 lines, and writing them stalled the reactor. The first event of
    a quiet spell is logged at once, as it is; the others of the next
    `interval` seconds are counted and said in one line, with the latest
    event's fields, when the interval ends.
    """

    def __init__(self, logger: Logger, clock: IReactorTime, interval: float | None = None) -> None:
        self.logger = logger
        self.clock = clock
        self.interval = _repeat_interval if interval is None else interval
        self._kinds: dict[str, _Repeats] = {}

    def emit(self, kind: str, level: LogLevel, format: str, **fields: Any) -> None:
        now = self.clock.seconds()
        repeats = self._kinds.get(kind)
        if repeats is None or (repeats.timer is None and now - repeats.since >= self.interval):
            self.logger.emit(level, format, event=kind, **fields)
            self._kinds[kind] = _Repeats(kind, level, format, fields, since=now)
            return
        repeats.count += 1
        repeats.level, repeats.format, repeats.fields = level, format, fields
        if repeats.timer is None:
            repeats.timer = self.clock.callLater(max(0.0, repeats.since + self.interval - now), self._interval_over, kind)

    def _interval_over(self, kind: str) -> None:
        repeats = self._kinds[kind]
        repeats.timer = None
        self._say_count(repeats)
        # Still flooding, maybe: the next interval counts from now.
        repeats.count = 0
        repeats.since = self.clock.seconds()

    def _say_count(self, repeats: _Repeats) -> None:
        self.logger.emit(
            repeats.level,
            repeats.format + " (and {log_repeats} more like it in the last {log_repeat_interval:g} s)",
            **repeats.fields,
            event=repeats.kind,
            log_repeats=repeats.count,
            log_repeat_interval=self.interval,
        )

    def stop(self) -> None:
        """Say the counts not said yet and cancel the timers."""
        kinds, self._kinds = self._kinds, {}
        for repeats in kinds.values():
            if repeats.timer is not None and repeats.timer.active():
                repeats.timer.cancel()
            if repeats.count:
                self._say_count(repeats)
