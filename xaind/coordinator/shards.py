"""The coordinator's end of several aggregator shards (`aggregator.shards` above 1; docs/scale.rst).

Each shard is its own `twistd xain-aggregator` with a `shard` section
(name, URL, weight), logged in over the PB link like a lone aggregator.
`ShardedAggregators` stands where the lone aggregator's `AggregatorLink`
stands, so the coordinator service and the round rules do not know how
many there are:

- **admit**: the first admission of a participant in a round assigns it a
  shard (`RoundAssignment`: balanced by weight, only shards whose model is
  the round's); `url_for` then names that shard in its `start_training`
  answer, and the admission goes to that shard alone;
- **aggregate**: each shard holding counted results writes its partial
  sum (`partial_sum`), the first of them in name order (the reducer)
  fetches the others' straight from them and adds all in name order
  (`reduce`), and every other shard installs the reducer's model
  (`install`); only then is the round aggregated. The files travel
  between the shards; the coordinator hands out one-use tokens;
- **sync**: a shard behind the others (it was down during an install)
  first installs the newest model from one that has it, then every shard
  is lined up with the coordinator's round as a lone aggregator is, each
  with its own participants' results.

A shard that detaches while it holds participants of the round makes the
coordinator run the round again (`on_shard_lost`): its participants'
results may be lost with it, and none may count twice. The round runs
on the shards left; the lost one rejoins at its next login.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from xaind.aggregator.shard_files import shard_file_url
from xaind.coordinator.aggregator_link import AggregatorLink, IAggregator, LinkMetrics, RemoteAggregator
from xaind.coordinator.shard_assignment import NoShardError, RoundAssignment, Shard
from xaind.gathering import gather
from xaind.logs import get_logger
from xaind.protocol import PBMethod

log = get_logger("xaind.coordinator.shards")

#: Every participant of a round weighs the same (it downloads the model and uploads one result): balancing
#: bytes is balancing counts, scaled by the shards' weights.
PARTICIPANT_WEIGHT = 1


class ShardsUnavailable(Exception):
    """A round's end cannot be carried out with the shards attached now (one line: which, why)."""


def new_file_token() -> str:
    """A token for one file lent between shards: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


@dataclass(eq=False)
class AttachedShard:
    """A shard logged in now: who it says it is, and the link its calls go through."""

    name: str
    url: str
    weight: int
    remote: RemoteAggregator
    #: The round of the global model it holds (from its login, then from every install and sync).
    model_round: int
    link: AggregatorLink = field(init=False)


@implementer(IAggregator)
class ShardedAggregators:
    """Several aggregators, each folding its own participants; a round ends with their reduce."""

    def __init__(self, clock: IReactorTime, shards: int, tokens: Callable[[], str] = new_file_token) -> None:
        self.clock = clock
        #: `aggregator.shards`: how many may be attached at once (more logins are refused).
        self.expected = shards
        self._new_token = tokens
        self._shards: dict[str, AttachedShard] = {}
        self._assignment = RoundAssignment([], PARTICIPANT_WEIGHT)
        self._assigned_round: int | None = None
        self._waiting_for_shard: list[tuple[int, Deferred[AttachedShard]]] = []
        #: Told the shard's name when one that holds participants of the round detaches.
        self.on_shard_lost: Callable[[str], None] | None = None
        #: Told when a shard attached (the coordinator then syncs it).
        self.on_attached: Callable[[], None] | None = None
        #: The coordinator's view for a sync as it is now (`CoordinatorService.sync_view`): see `sync`.
        self.current_view: Callable[[], tuple[int, list[str] | None, dict[str, str]]] | None = None
        self.metrics: LinkMetrics | None = None

    # -- attachments -----------------------------------------------------------------

    def is_attached(self) -> bool:
        return bool(self._shards)

    def attached_shards(self) -> list[dict[str, Any]]:
        """The shards attached now, in name order (for status)."""
        return [
            {"name": shard.name, "url": shard.url, "weight": shard.weight, "model_round": shard.model_round,
             "participants": len(self._assignment.participants_of(shard.name)) if self._is_assignable(shard) else 0}
            for shard in self._in_order()
        ]

    def attach(self, remote: RemoteAggregator) -> Deferred[None]:
        """Ask a newly logged-in aggregator who it is, then count it among the shards."""
        asking = remote.callRemote(PBMethod.SHARD)

        def introduced(info: dict[str, Any]) -> None:
            name, url, weight, model_round = str(info["name"]), str(info["url"]), int(info["weight"]), int(info["model_round"])
            previous = self._shards.get(name)
            if previous is None and len(self._shards) >= self.expected:
                log.error(
                    "refused aggregator shard {name}: {count} shards are attached already (aggregator.shards)",
                    name=name, count=len(self._shards),
                )
                return
            if previous is not None:
                self._lose(previous, "replaced by a new login of the same name")
            shard = AttachedShard(name, url, weight, remote, model_round)
            shard.link = AggregatorLink(self.clock)
            shard.link.attach(remote)
            self._shards[name] = shard
            if self.metrics is not None:
                self.metrics.aggregator_attached()
            log.info("aggregator shard {name} attached ({url}, model of round {round})", name=name, url=url, round=model_round)
            self._wake_waiters()
            if self.on_attached is not None:
                self.on_attached()

        def not_introduced(failure: Failure) -> None:
            log.error("an aggregator logged in but did not say which shard it is: {error} (is shard.name set?)",
                      error=failure.getErrorMessage())

        return asking.addCallbacks(introduced, not_introduced)

    def detach(self, remote: RemoteAggregator) -> None:
        for shard in list(self._shards.values()):
            if shard.remote is remote:
                self._lose(shard, "its link is down")

    def _lose(self, shard: AttachedShard, why: str) -> None:
        del self._shards[shard.name]
        shard.link.detach(shard.remote)
        if self.metrics is not None:
            self.metrics.aggregator_detached()
        orphans: tuple[str, ...] = ()
        if shard.name in {assigned.name for assigned in self._assignment.shards}:
            orphans = self._assignment.remove_shard(shard.name)
        log.warn("aggregator shard {name} detached: {why}", name=shard.name, why=why)
        if orphans and self.on_shard_lost is not None:
            self.on_shard_lost(shard.name)

    def _in_order(self) -> list[AttachedShard]:
        """The attached shards in name order: the reduce's fixed order."""
        return [self._shards[name] for name in sorted(self._shards)]

    def _is_assignable(self, shard: AttachedShard) -> bool:
        return shard.name in {assigned.name for assigned in self._assignment.shards}

    # -- admissions ------------------------------------------------------------------

    def url_for(self, participant_id: str) -> str | None:
        """The URL of the participant's shard (its start-training answer), None if it has none."""
        shard = self._assignment.shard_of(participant_id)
        return None if shard is None else self._shards[shard.name].url

    def admit(self, participant_id: str, token: str, round: int) -> Deferred[None]:
        """Assign the participant a shard whose model is of `round` (waiting for one if none is), and admit it there."""
        waiting = self._shard_for(participant_id, round)
        waiting.addCallback(lambda shard: shard.link.admit(participant_id, token, round))
        return waiting

    def _shard_for(self, participant_id: str, round: int) -> Deferred[AttachedShard]:
        self._start_round(round)
        try:
            assigned = self._assignment.assign(participant_id)
        except NoShardError:
            waiter: Deferred[AttachedShard] = Deferred(lambda cancelled: self._waiting_for_shard.remove((round, cancelled)))
            self._waiting_for_shard.append((round, waiter))
            waiter.addCallback(lambda _: self._shard_for(participant_id, round))
            return waiter
        return succeed(self._shards[assigned.name])

    def _start_round(self, round: int) -> None:
        """A new assignment when the round changes, over the shards whose model is of that round."""
        if self._assigned_round == round:
            self._add_current_shards(round)
            return
        self._assigned_round = round
        self._assignment = RoundAssignment([], PARTICIPANT_WEIGHT)
        self._add_current_shards(round)

    def _add_current_shards(self, round: int) -> None:
        for shard in self._in_order():
            if shard.model_round == round and not self._is_assignable(shard):
                self._assignment.add_shard(Shard(shard.name, shard.weight))

    def _wake_waiters(self) -> None:
        waiting, self._waiting_for_shard = self._waiting_for_shard, []
        for round, waiter in waiting:
            if any(shard.model_round == round for shard in self._shards.values()):
                waiter.callback(None)
            else:
                self._waiting_for_shard.append((round, waiter))

    # -- a round's end ---------------------------------------------------------------

    @inlineCallbacks
    def aggregate(self, round: int, counted: list[str]) -> Any:
        """Partial sums on the shards that hold counted results, the reduce on the first, the install on all."""
        by_shard: dict[str, list[str]] = {}
        for participant_id in counted:
            shard = self._assignment.shard_of(participant_id) if self._assigned_round == round else None
            if shard is None or shard.name not in self._shards:
                raise ShardsUnavailable(f"results_missing: the shard of a counted result of round {round} is gone")
            by_shard.setdefault(shard.name, []).append(participant_id)
        involved = [shard for shard in self._in_order() if shard.name in by_shard]
        if not involved:
            raise ShardsUnavailable(f"no shard holds a counted result of round {round}")
        tokens = {shard.name: self._new_token() for shard in involved}
        yield gather(shard.link.call(PBMethod.PARTIAL_SUM, round, by_shard[shard.name], tokens[shard.name]) for shard in involved)
        reducer = involved[0]
        sources = [None if shard is reducer else shard_file_url(shard.url, tokens[shard.name]) for shard in involved]
        model_token = self._new_token()
        reduced = yield reducer.link.call(PBMethod.REDUCE, round, sources, model_token)
        model_round, etag = int(reduced["model_round"]), str(reduced["etag"])
        reducer.model_round = model_round
        log.info("round {round} reduced by shard {reducer} from {count} partial sum(s)", round=round, reducer=reducer.name, count=len(involved))
        others = [shard for shard in self._in_order() if shard is not reducer]
        yield self._install(others, model_round, shard_file_url(reducer.url, model_token), etag)
        self._assigned_round = None
        return None

    @inlineCallbacks
    def _install(self, shards: list[AttachedShard], model_round: int, url: str, etag: str) -> Any:
        """Have `shards` install the model lent at `url`; one that fails stays behind (no participants) until a sync."""
        problems = yield gatherResults(
            [shard.link.call(PBMethod.INSTALL, model_round, url, etag).addCallbacks(lambda _: None, _problem) for shard in shards]
        )
        for shard, problem in zip(shards, problems):
            if problem is not None:
                log.warn("shard {name} could not install the model of round {round}: {error}; it gets no participants until it has",
                         name=shard.name, round=model_round, error=problem)
            else:
                shard.model_round = model_round
        return None

    # -- lining up ---------------------------------------------------------------------

    @inlineCallbacks
    def sync(self, round: int, done: list[str] | None, admitted: dict[str, str]) -> Any:
        """Line every shard up with the coordinator's `round`, each with its own participants' results and tokens.

        The shards are asked for their models' rounds first, and the round
        goes on meanwhile (a round run again selects at once; results are
        kept and counted): the shards' syncs then carry the coordinator's
        view as it is when they are sent (`current_view`), not as it was when
        this sync began, or they would drop the tokens and results of the
        uploads made in between.
        """
        shards = self._in_order()
        infos = yield gather(shard.link.call(PBMethod.SHARD) for shard in shards)
        for shard, info in zip(shards, infos):
            shard.model_round = int(info["model_round"])
        newest = max((shard.model_round for shard in shards), default=round)
        if newest > round:
            # A reduce finished unheard: the coordinator catches up first, then syncs again.
            return {"model_round": newest, "missing": []}
        behind = [shard for shard in shards if shard.model_round < newest]
        if behind:
            source = next(shard for shard in shards if shard.model_round == newest)
            token = self._new_token()
            lent = yield source.link.call(PBMethod.LEND_MODEL, token)
            yield self._install(behind, int(lent["model_round"]), shard_file_url(source.url, token), str(lent["etag"]))
        if self.current_view is not None:
            now_round, now_done, now_admitted = self.current_view()
            if now_round == round:
                done, admitted = now_done, now_admitted
        kept = set(done or ()) | set(admitted)
        if self._assigned_round == round:
            for participant_id in set(self._assignment.assignment()) - kept:
                self._assignment.release(participant_id)
        else:
            self._assigned_round = None
        missing: set[str] = set()
        answers = []
        for shard in shards:
            own_done = None if done is None else [p for p in done if self._holds(shard, p, round)]
            own_admitted = {p: token for p, token in admitted.items() if self._holds(shard, p, round)}
            answers.append(shard.link.sync(round, own_done, own_admitted))
        results = yield gather(answers)
        for result in results:
            missing.update(result["missing"])
        if done is not None:
            missing.update(p for p in done if not any(self._holds(shard, p, round) for shard in shards))
        for shard in shards:
            shard.model_round = max(shard.model_round, round)
        self._wake_waiters()
        return {"model_round": round, "missing": sorted(missing)}

    def _holds(self, shard: AttachedShard, participant_id: str, round: int) -> bool:
        if self._assigned_round != round:
            return False
        assigned = self._assignment.shard_of(participant_id)
        return assigned is not None and assigned.name == shard.name


def _problem(failure: Failure) -> str:
    """A failed call as one line, which ends its failure (an install that failed leaves its shard behind, no more)."""
    return failure.getErrorMessage() or failure.type.__name__
