"""JSON lines for log collectors (`logging.format: json`): one event per line, its fields as fields.

A line looks like::

    {"time": "2026-11-29T20:41:07.513204+00:00", "timestamp": 1796000467.513204, "level": "info",
     "namespace": "xaind.aggregator.service", "event": "admitted_for_round",
     "text": "admitted 3f2a... for round 2", "participant": "3f2a...", "round": 2}

`time`, `timestamp`, `level`, `namespace`, `event` and `text` are always
there; the event's own fields follow at the top level (so that `jq
'select(.participant == "...")'` or a collector's JSON parser finds them
without a path). A field whose name is one of those keys is renamed
`field_<name>`. Twisted's bookkeeping keys (`log_*`) are left out, but
for a repeated event's count (`repeats`, `repeat_interval`); a failure's
traceback is `traceback`.

The event name (`event`) is what a collector groups by, so it must not
carry the event's values: it is the event's own `event` field when the call
gives one (`RepeatedEventLog` gives its kind), otherwise it is derived from
the format string's literal words (`event_name`), which change only when
the wording of the message does. Deriving it keeps every existing and future
log call named without an argument added to each one.

Only text the text format would show, and the names and values of fields,
go out; a field whose name says it is a credential (`secret`, `token`,
`password`) is never written, whatever its value: fields the text format
leaves unformatted are written here, and a careless field must not leak.

twistd owns the log output. The daemon's options (`DaemonOptions`) call
`write_json_lines_from_twistd` while twistd parses its command line, which
names `twistd_observer` as twistd's `--logger`: twistd then installs it as
its only observer, so Twisted's own lines are JSON too and the file holds
one format. The observer writes where twistd would have written its text
(`--logfile`, stdout with `--nodaemon`, `twistd.log` otherwise, rotated on
SIGUSR1 as twistd does). An operator's own `--logger` wins; with
`--syslog` the lines stay syslog's.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import signal
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

__all__ = [
    "RESERVED_KEYS",
    "event_as_json_line",
    "event_name",
    "json_lines_observer",
    "twistd_observer",
    "write_json_lines_from_twistd",
]

#: The keys every line has, in this order.
RESERVED_KEYS = ("time", "timestamp", "level", "namespace", "event", "text")
#: Words in a field's name that make it a credential, left out of every line.
CREDENTIAL_WORDS = ("secret", "token", "password")
#: Value of a credential field: the field's presence is still told.
WITHHELD = "<withheld>"
#: A value shown as text is cut here: a field's repr must not make a line of megabytes.
LONGEST_SHOWN_VALUE = 2000
#: Words of the format string that make an event's name.
NAME_WORDS = 8
#: The name of an event whose format has no words of its own (Twisted's legacy `log.msg` lines).
UNNAMED_EVENT = "message"

#: xaind's own `log_` fields (`RepeatedEventLog`'s count), written under these names.
_OWN_LOG_FIELDS = {"log_repeats": "repeats", "log_repeat_interval": "repeat_interval"}

#: What Twisted's legacy `log.msg` adds to an event, all of it in `text` already (or `traceback`).
_LEGACY_KEYS = frozenset({"message", "time", "isError", "format", "why", "failure", "printed"})

_FIELD = re.compile(r"\{[^{}]*\}")
_PARENTHESISED = re.compile(r"\([^()]*\)")
_WORD = re.compile(r"[a-z0-9]+")


def event_name(event: Mapping[str, Any]) -> str:
    """A short name for the kind of `event`, the same for every event of that kind.

    The event's `event` field if it is a string; else the words of the
    format string outside its fields and parentheses, before the first
    ``": "`` that has words ahead of it (what follows a colon is detail),
    lowercased and joined by ``_``, at most `NAME_WORDS` of them:
    ``"round {round} complete: asking the aggregator"`` is
    ``round_complete``.
    """
    given = event.get("event")
    if isinstance(given, str) and given:
        return given
    format_string = event.get("log_format")
    if not isinstance(format_string, str):
        return UNNAMED_EVENT
    literal = _PARENTHESISED.sub(" ", _FIELD.sub(" ", format_string.replace("{{", "").replace("}}", "")))
    for part in literal.split(": "):
        words = _WORD.findall(part.lower())
        if words:
            return "_".join(words[:NAME_WORDS])
    return UNNAMED_EVENT


def _is_credential(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in CREDENTIAL_WORDS)


def _shown(text: str) -> str:
    return text if len(text) <= LONGEST_SHOWN_VALUE else text[:LONGEST_SHOWN_VALUE] + "…"


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` as something `json.dumps` writes as standard JSON: numbers, strings, lists, objects.

    NaN and infinities (not JSON) and anything else become their text, as
    the text format would show them.
    """
    if value is None or isinstance(value, (bool, str)):
        return _shown(value) if isinstance(value, str) else value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if depth < 3 and isinstance(value, (list, tuple)):
        return [json_safe(item, depth + 1) for item in value]
    if depth < 3 and isinstance(value, Mapping):
        return {
            str(key): WITHHELD if _is_credential(str(key)) else json_safe(item, depth + 1) for key, item in value.items()
        }
    try:
        return _shown(str(value))
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the line
        return f"<unprintable {type(value).__name__}>"


def event_as_dict(event: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of one event (see the module docstring)."""
    timestamp = event.get("log_time")
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds"),
        "timestamp": timestamp,
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "event": event_name(event),
        "text": formatEvent(dict(event)),
    }
    legacy = "log_legacy" in event or event.get("log_namespace") == "log_legacy"
    for name, value in event.items():
        if not isinstance(name, str) or name == "event" or (legacy and name in _LEGACY_KEYS):
            continue
        if name.startswith("log_"):
            if name not in _OWN_LOG_FIELDS:
                continue
            name = _OWN_LOG_FIELDS[name]
        key = f"field_{name}" if name in line or name == "traceback" else name
        line[key] = WITHHELD if _is_credential(name) else json_safe(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        try:
            line["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001 - the line is still worth writing without it
            line["traceback"] = f"<no traceback: {failure.type!r}>"
    return line


def event_as_json_line(event: Mapping[str, Any]) -> str:
    """One line of JSON, newline-terminated, for `FileLogObserver`."""
    return json.dumps(event_as_dict(event), ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def json_lines_observer(out_file: IO[str]) -> ILogObserver:
    """An observer writing every event to `out_file` as one JSON line (flushed after each)."""
    return FileLogObserver(out_file, event_as_json_line)


# -- twistd ----------------------------------------------------------------------------------------

#: What twistd was told about its log output, kept for `twistd_observer` (a factory takes no arguments).
_twistd_output: dict[str, Any] = {}


def write_json_lines_from_twistd(server_options: Any) -> bool:
    """Make twistd log JSON lines, if it is to log anywhere this module can write; True if so.

    `server_options` is twistd's own options, being parsed (the plugin's
    options' `parent`). Called before twistd makes its logger, which reads
    its `logger` option: naming `twistd_observer` there is what `--logger`
    does. Not with an operator's `--logger` nor with `--syslog`.
    """
    if server_options.get("logger") is not None or server_options.get("syslog"):
        return False
    _twistd_output.update(logfile=server_options.get("logfile"), nodaemon=bool(server_options.get("nodaemon")))
    server_options["logger"] = f"{__name__}.twistd_observer"
    return True


def _twistd_log_file() -> IO[str]:
    """The file twistd would have written its text to, given its options (stdout without them)."""
    path = _twistd_output.get("logfile")
    daemonizing = not _twistd_output.get("nodaemon", True)
    if path == "-" or (not path and not daemonizing):
        if daemonizing:
            raise SystemExit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    log_file = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        # As twistd's text file: SIGUSR1 rotates (logrotate's postrotate), in the reactor's thread.
        def rotate(signal_number: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file  # type: ignore[return-value]


def twistd_observer() -> ILogObserver:
    """twistd's `--logger` factory: JSON lines where twistd would have written text."""
    return json_lines_observer(_twistd_log_file())
