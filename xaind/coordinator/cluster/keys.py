"""The names of the shared state's keys, all under the configured prefix (`state.redis.prefix`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def leader(self) -> str:
        """The lease: the leader's process id, with an expiry the leader keeps pushing back."""
        return f"{self.prefix}leader"

    @property
    def round(self) -> str:
        """Hash: `round`, `phase`, `seq` (the last event's number) and `counted` (JSON, while aggregating)."""
        return f"{self.prefix}round"

    @property
    def participants(self) -> str:
        """Hash: participant id -> its state (ParticipantState's value)."""
        return f"{self.prefix}participants"

    @property
    def tokens(self) -> str:
        """Hash: participant id -> its training token of this round."""
        return f"{self.prefix}tokens"

    @property
    def training(self) -> str:
        """Hash: selected participant id -> the time by which it must deliver (training_timeout)."""
        return f"{self.prefix}training"

    @property
    def credentials(self) -> str:
        """Hash: participant id -> "<kind>:<digest hex>" of the credential it joined with."""
        return f"{self.prefix}credentials"

    @property
    def deadlines(self) -> str:
        """Sorted set: participant id scored by the time its heartbeats are due by."""
        return f"{self.prefix}deadlines"

    @property
    def inbox(self) -> str:
        """List: what followers hand the leader (rendez-vous, start-training requests), in order."""
        return f"{self.prefix}inbox"

    @property
    def events(self) -> str:
        """Pub/sub channel: the leader's changes, applied by every process to its replica."""
        return f"{self.prefix}events"

    def replies(self, process_id: str) -> str:
        """List: the leader's answers to one process's forwarded requests."""
        return f"{self.prefix}replies:{process_id}"
