"""Which aggregator shard each selected participant of a round sends its result to.

With more than one aggregator attached (shards), the coordinator names one
shard in each selected participant's ``start_training`` answer; that shard
serves the participant's download and receives its upload. The rule
balances bytes: a participant weighs ``participant_bytes`` (the model it
downloads plus the result it uploads, or only the upload when S3 serves the
downloads), the same for every participant of a round, so balancing bytes
amounts to balancing counts, scaled by each shard's ``weight`` (a relative
capacity, 1 unless the operator says a machine is bigger).

The rule is greedy and exact: a participant goes to the shard whose load
after taking it, divided by its weight, is the smallest, ties broken by
shard order (the order shards attached in). Comparisons are made on
integers (``(load + bytes) * other_weight``), so no float rounding decides.
Consequences:

- deterministic: the same shards, the same earlier assignments and the same
  participants in the same order give the same assignment;
- between two shards of equal weight the counts differ by at most one
  participant (the chosen shard always holds the fewest among shards of its
  weight), as long as participants are only added and shards only leave
  (a `release` leaves a gap that the next participants fill); a shard that joins mid-round starts
  empty and takes the next participants until it has caught up;
- a shard that leaves moves only its own participants (`remove_shard` hands
  them back unassigned; assigning them again puts each where the rule says).

Pure bookkeeping: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["NoShardError", "RoundAssignment", "Shard", "ShardAssignmentError", "choose_shard"]


class ShardAssignmentError(ValueError):
    """An assignment request that makes no sense (a shard named twice, an unknown shard, a bad weight)."""


class NoShardError(ShardAssignmentError):
    """A participant must be assigned but no aggregator shard is attached."""


@dataclass(frozen=True)
class Shard:
    """An attached aggregator: a stable name (its link's identity or URL) and its relative capacity."""

    name: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or self.weight < 1:
            raise ShardAssignmentError(f"shard {self.name!r}: weight must be a positive integer, not {self.weight!r}")


def choose_shard(shards: Sequence[Shard], loads: Mapping[str, int], participant_bytes: int) -> Shard:
    """The shard a participant of `participant_bytes` goes to, given the shards' current `loads` (bytes).

    The smallest ``(load + participant_bytes) / weight``; the first in
    `shards` order among equals. A shard missing from `loads` holds nothing.
    """
    if not shards:
        raise NoShardError("no aggregator shard is attached: a participant cannot be assigned")
    best = shards[0]
    best_after = loads.get(best.name, 0) + participant_bytes
    for shard in shards[1:]:
        after = loads.get(shard.name, 0) + participant_bytes
        if after * best.weight < best_after * shard.weight:  # after/weight < best_after/best.weight, exactly
            best, best_after = shard, after
    return best


class RoundAssignment:
    """One round's assignment of participants to shards, and each shard's load in bytes."""

    def __init__(self, shards: Iterable[Shard], participant_bytes: int) -> None:
        if participant_bytes < 0:
            raise ShardAssignmentError(f"participant_bytes must not be negative, not {participant_bytes}")
        self.participant_bytes = participant_bytes
        self._shards: list[Shard] = []
        self._loads: dict[str, int] = {}
        self._members: dict[str, dict[str, int]] = {}  # shard -> participant -> bytes, in assignment order
        self._shard_of: dict[str, str] = {}
        for shard in shards:
            self.add_shard(shard)

    # -- shards

    @property
    def shards(self) -> tuple[Shard, ...]:
        """The attached shards, in the order ties are broken by."""
        return tuple(self._shards)

    def add_shard(self, shard: Shard) -> None:
        """Attach a shard (last in order); it starts empty, so the next participants go to it first."""
        if shard.name in self._loads:
            raise ShardAssignmentError(f"shard {shard.name!r} is already attached")
        self._shards.append(shard)
        self._loads[shard.name] = 0
        self._members[shard.name] = {}

    def remove_shard(self, name: str) -> tuple[str, ...]:
        """Detach a shard; its participants, in their assignment order, now unassigned. Nobody else moves."""
        if name not in self._loads:
            raise ShardAssignmentError(f"shard {name!r} is not attached")
        orphans = tuple(self._members.pop(name))
        del self._loads[name]
        self._shards = [shard for shard in self._shards if shard.name != name]
        for participant in orphans:
            del self._shard_of[participant]
        return orphans

    # -- participants

    def assign(self, participant: str, participant_bytes: int | None = None) -> Shard:
        """The participant's shard: the one it already has, or the rule's choice (then counted in its load)."""
        current = self.shard_of(participant)
        if current is not None:
            return current
        cost = self.participant_bytes if participant_bytes is None else participant_bytes
        shard = choose_shard(self._shards, self._loads, cost)
        self._loads[shard.name] += cost
        self._members[shard.name][participant] = cost
        self._shard_of[participant] = shard.name
        return shard

    def assign_all(self, participants: Iterable[str]) -> dict[str, Shard]:
        """`assign` each participant in order; participant -> shard."""
        return {participant: self.assign(participant) for participant in participants}

    def release(self, participant: str) -> Shard | None:
        """Forget a participant (it left the round): its bytes leave its shard's load. Its former shard, if any."""
        name = self._shard_of.pop(participant, None)
        if name is None:
            return None
        self._loads[name] -= self._members[name].pop(participant)
        return self._shard(name)

    def shard_of(self, participant: str) -> Shard | None:
        name = self._shard_of.get(participant)
        return None if name is None else self._shard(name)

    def participants_of(self, name: str) -> tuple[str, ...]:
        """A shard's participants, in assignment order."""
        if name not in self._members:
            raise ShardAssignmentError(f"shard {name!r} is not attached")
        return tuple(self._members[name])

    def loads(self) -> dict[str, int]:
        """Bytes assigned to each shard, in shard order."""
        return {shard.name: self._loads[shard.name] for shard in self._shards}

    def assignment(self) -> dict[str, str]:
        """participant -> shard name, for every assigned participant."""
        return dict(self._shard_of)

    def _shard(self, name: str) -> Shard:
        return next(shard for shard in self._shards if shard.name == name)
