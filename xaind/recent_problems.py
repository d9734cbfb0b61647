"""The last warnings and errors of a daemon's own log, kept for ``/status`` and the status page.

``/status`` is read by anyone who reaches the API, and a participant id is
what a participant shows the coordinator: ids in these lines are shortened
(`shortened`), as everywhere the daemons show participants to others.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.logger import LogLevel, formatEvent

__all__ = ["RecentProblems", "SHOWN_ID_CHARACTERS", "shortened"]

SHOWN_ID_CHARACTERS = 8
#: Event fields that hold a participant id.
_PARTICIPANT_FIELDS = ("participant", "participant_id")


def shortened(participant_id: str) -> str:
    """The first characters of an id: enough to tell participants apart on a page, not to act as one."""
    return participant_id[:SHOWN_ID_CHARACTERS] + ("…" if len(participant_id) > SHOWN_ID_CHARACTERS else "")


class RecentProblems:
    """A log observer keeping the last `kept` warnings and errors of the ``xaind`` namespaces."""

    def __init__(self, kept: int = 20) -> None:
        self.lines: deque[dict[str, Any]] = deque(maxlen=kept)

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        namespace = event.get("log_namespace", "")
        if level is None or level < LogLevel.warn or not str(namespace).startswith("xaind"):
            return
        shown = dict(event)
        for field in _PARTICIPANT_FIELDS:
            if isinstance(shown.get(field), str):
                shown[field] = shortened(shown[field])
        self.lines.append(
            {"time": event.get("log_time"), "level": level.name, "source": namespace, "text": formatEvent(shown)}
        )

    def status(self) -> list[dict[str, Any]]:
        """Oldest first."""
        return list(self.lines)
