"""`xaind top URL [AGGREGATOR_URL]`: the coordinator's ``/status`` in a terminal, redrawn in place.

For an operator on a server without a browser: the same facts as the
status page (how far the training is, who is in the round, the aggregator
link, how long rounds took, the last warnings and errors), read from the
same JSON, redrawn every `interval` seconds until Ctrl-C. With the
aggregator's URL too, a line of its own ``/status`` (global model, uploads,
the last aggregation).

Redrawing moves the cursor home and overwrites each line, then clears what
is left below: no flicker, and no curses (whose terminal database a minimal
server may lack). `--once` prints one frame without any escape sequence,
for scripts and tests. Rendering (`render`) is a pure function of the
status documents, apart from reading them (`read_status`), so that it is
tested without a daemon.
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import IO, Any

__all__ = ["StatusUnavailable", "read_status", "render", "run", "status_url"]

#: Seconds between two frames.
DEFAULT_INTERVAL = 1.0
#: Bound on one request for ``/status``.
DEFAULT_TIMEOUT = 5.0
BAR_WIDTH = 30
SHOWN_ROUNDS = 5
SHOWN_PROBLEMS = 5

#: Cursor home; erase to the end of the line; erase below the cursor; hide and show the cursor.
HOME, ERASE_LINE, ERASE_BELOW, HIDE_CURSOR, SHOW_CURSOR = "\x1b[H", "\x1b[K", "\x1b[J", "\x1b[?25l", "\x1b[?25h"
#: Erase the whole screen, once before the first frame.
ERASE_SCREEN = "\x1b[2J"


class StatusUnavailable(Exception):
    """A ``/status`` that did not answer, or not with a JSON object: one line to show."""


def status_url(url: str) -> str:
    """`url` with ``/status`` as its path unless it already ends so (``http://host:8081`` is enough)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def read_status(url: str, timeout: float = DEFAULT_TIMEOUT, ca_file: str | None = None) -> dict[str, Any]:
    """The JSON object at `url` (a ``/status``); `StatusUnavailable` with the reason otherwise."""
    context = None if ca_file is None else ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as error:
        error.close()
        raise StatusUnavailable(f"{url}: answered {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise StatusUnavailable(f"{url}: {getattr(error.reason, 'strerror', None) or error.reason}") from None
    except (OSError, ValueError) as error:  # timeouts, resets, a body that is not JSON
        raise StatusUnavailable(f"{url}: {error or type(error).__name__}") from None
    if not isinstance(document, dict):
        raise StatusUnavailable(f"{url}: not a status document")
    return document


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#########---------]``: `done` of `total`, in `width` characters between the brackets."""
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _coordinator_lines(status: Mapping[str, Any]) -> list[str]:
    rounds = int(status.get("rounds") or 0)
    current = int(status.get("round") or 0)
    done = min(current, rounds)
    phase = status.get("phase", "?")
    where = "training complete" if phase == "complete" else f"current round {current}"
    percent = 0 if rounds <= 0 else round(100 * done / rounds)
    participants = status.get("participants") or {}
    counts = "  ".join(f"{name.replace('_', ' ')} {participants[name]}" for name in participants)
    since = status.get("seconds_since_last_aggregation")
    lines = [
        f"Rounds        {done} of {rounds} done  {progress_bar(done, rounds)} {percent:3d}%   {where}",
        f"Phase         {phase}",
        f"Waiting for   {status.get('waiting_for') or '-'}",
        f"Participants  {counts or '-'}   (at least {status.get('minimum_participants', '?')} a round)",
        f"Aggregator    {'attached' if status.get('aggregator_attached') else 'NOT ATTACHED'}"
        f"   last aggregation {'none yet' if since is None else _seconds(since) + ' ago'}",
    ]
    if status.get("state_write_failure"):
        lines.append(f"State         cannot write the round counter: {status['state_write_failure']}")
    finished = list(status.get("finished_rounds") or [])[-SHOWN_ROUNDS:]
    lines += ["", f"Finished rounds (last {SHOWN_ROUNDS})"]
    if finished:
        lines.append("  round   duration  participants  outcome     ended (UTC)")
        for entry in reversed(finished):
            lines.append(
                f"  {entry.get('round', '?'):>5}  {_seconds(entry.get('duration_s')):>9}  {entry.get('participants', '?'):>12}  "
                f"{entry.get('outcome', '?'):<10}  {_clock(entry.get('ended_at'))}"
            )
    else:
        lines.append("  none yet")
    problems = list(status.get("recent_problems") or [])[-SHOWN_PROBLEMS:]
    lines += ["", f"Recent warnings and errors (last {SHOWN_PROBLEMS})"]
    if problems:
        for problem in reversed(problems):
            lines.append(f"  {_clock(problem.get('time'))} {problem.get('level', '?'):<8} {problem.get('source', '')}: {problem.get('text', '')}")
    else:
        lines.append("  none")
    return lines


def _aggregator_lines(status: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Aggregator    global model of round {status.get('model_round', '?')} ({status.get('model_bytes', '?')} bytes)"
        f"   {'linked to the coordinator' if status.get('coordinator_attached') else 'NOT LINKED to the coordinator'}",
        f"Uploads       admitted {status.get('admitted', '?')}  uploading {status.get('uploading', '?')}  accepted {status.get('accepted', '?')}"
        f"{'   aggregating' if status.get('aggregating') else ''}",
    ]
    last = status.get("last_aggregation")
    if isinstance(last, Mapping):
        median = last.get("median_update_norm")
        lines.append(
            f"Last round    {last.get('round', '?')} ({last.get('strategy', '?')}): {last.get('results', '?')} result(s)"
            f", median update norm {'-' if median is None else f'{median:.4g}'}"
            + (f", outliers {', '.join(last['outliers'])}" if last.get("outliers") else "")
        )
    privacy = status.get("privacy")
    if isinstance(privacy, Mapping) and privacy.get("epsilon") is not None:
        lines.append(f"Privacy       epsilon {privacy['epsilon']:.4g} at delta {privacy.get('delta')} after {privacy.get('rounds')} round(s)")
    return lines


def render(
    coordinator: Mapping[str, Any] | StatusUnavailable,
    aggregator: Mapping[str, Any] | StatusUnavailable | None = None,
    *,
    url: str = "",
    now: float | None = None,
) -> list[str]:
    """The lines of one frame: the coordinator's status (or why it is missing), then the aggregator's."""
    lines = [f"xaind top  {url}  {_clock(time.time() if now is None else now)} UTC", ""]
    if isinstance(coordinator, StatusUnavailable):
        lines.append(f"Coordinator   not answering: {coordinator}")
    else:
        lines += _coordinator_lines(coordinator)
    if aggregator is not None:
        lines.append("")
        if isinstance(aggregator, StatusUnavailable):
            lines.append(f"Aggregator    not answering: {aggregator}")
        else:
            lines += _aggregator_lines(aggregator)
    return lines


def _read_or_why(url: str, timeout: float, ca_file: str | None) -> dict[str, Any] | StatusUnavailable:
    try:
        return read_status(url, timeout, ca_file)
    except StatusUnavailable as why:
        return why


def run(
    urls: Sequence[str],
    *,
    once: bool = False,
    interval: float = DEFAULT_INTERVAL,
    timeout: float = DEFAULT_TIMEOUT,
    ca_file: str | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show frames until Ctrl-C (0), or one with `once`; 1 if a URL does not answer at first.

    Once running, a daemon that stops answering is said in the frame and
    asked again at the next one: a restart should not end the view.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    coordinator_url, *rest = [status_url(url) for url in urls]
    aggregator_url = rest[0] if rest else None
    try:
        coordinator = read_status(coordinator_url, timeout, ca_file)
        aggregator = None if aggregator_url is None else read_status(aggregator_url, timeout, ca_file)
    except StatusUnavailable as why:
        print(f"xaind top: {why}", file=err)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while a slow daemon is asked: still a plain exit
        return 0
    frame = render(coordinator, aggregator, url=coordinator_url)
    if once:
        out.write("\n".join(frame) + "\n")
        return 0
    out.write(HIDE_CURSOR + ERASE_SCREEN)
    try:
        while True:
            # A line wider than the terminal wraps, a frame taller scrolls: either would
            # leave the next frame drawn off its place.
            width, height = shutil.get_terminal_size()
            shown = frame[: max(1, height - 1)]
            out.write(HOME + "".join(line[:width] + ERASE_LINE + "\n" for line in shown) + ERASE_BELOW)
            out.flush()
            sleep(interval)
            frame = render(
                _read_or_why(coordinator_url, timeout, ca_file),
                None if aggregator_url is None else _read_or_why(aggregator_url, timeout, ca_file),
                url=coordinator_url,
            )
    except KeyboardInterrupt:
        return 0
    finally:
        out.write(SHOW_CURSOR + "\n")
        out.flush()
