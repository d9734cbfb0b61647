"""The coordinator service: the round state machine wired to time and to the aggregator.

The state machine decides; this service keeps the participant timers (one
heartbeat timer per participant, one training timer per selected one) on an
injected clock, hands out tokens, asks the aggregator to admit and to
aggregate, and persists the round counter. The HTTP and PB front ends call
its methods and nothing else.

A successful aggregation becomes the next round only once the round
counter is on disk: the service writes it first and tells the state
machine after, so a write that fails (full or read-only `state_dir`, no
descriptors left) holds the round back, retried on the clock, instead of
running a round that a restart would run again.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from xaind.coordinator.aggregator_link import IAggregator
from xaind.coordinator.admission import RendezVousGate
from xaind.coordinator.authentication import Credential, ParticipantAuthenticator
from xaind.coordinator.metrics import CoordinatorMetrics
from xaind.coordinator.round_counter import RoundCounterWriter
from xaind.coordinator.round_history import RoundHistory
from xaind.coordinator.rounds import (
    AggregationRequested,
    Effect,
    HeartbeatAnswer,
    HeartbeatState,
    ParticipantRemoved,
    ParticipantState,
    Phase,
    ParticipantsSelected,
    RoundCompleted,
    RoundRepeated,
    RoundStateMachine,
    SelectionEnded,
    TrainingCompleted,
)
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings, ParticipantLimits
from xaind.logs import DEFAULT_REPEAT_INTERVAL, RepeatedEventLog, get_logger
from xaind.recent_problems import RecentProblems
from xaind.state import RoundProgress, RoundStore

log = get_logger("xaind.coordinator.service")

#: Selection pushes sent in one reactor turn; the rest follow on the next turns, so heartbeats are answered between.
PUSHES_PER_TURN = 1000

#: After a failed aggregation the round runs again after this wait, doubled for each failure in a row up to the
#: last: a failure that repeats (a rule that needs more results than the round has, a full disk) must not make
#: participants retrain and the daemons log in a tight loop.
AGGREGATION_RETRY_FIRST = 1.0
AGGREGATION_RETRY_MAX = 60.0


def aggregation_retry_delay(failures: int) -> float:
    """Seconds before the round runs again after `failures` failed aggregations in a row (>= 1)."""
    return min(AGGREGATION_RETRY_MAX, AGGREGATION_RETRY_FIRST * 2.0 ** min(failures - 1, 32))



@dataclass(frozen=True)
class RendezVousAnswer:
    participant_id: str
    ok: bool


@dataclass(frozen=True)
class StartTrainingAnswer:
    ok: bool
    url: str | None = None
    token: str | None = None


START_TRAINING_REFUSED = StartTrainingAnswer(ok=False)


class ParticipantNotifier(Protocol):
    """Where the coordinator pushes news to a participant that can take it (PB participants)."""

    def selected(self, round_number: int) -> None: ...

    def finished(self) -> None: ...


class PushTargets:
    """Where the front ends register who hears a participant's news (a PB mind, a held HTTP heartbeat).

    Shared by the lone coordinator and each process of several on Redis;
    the holder sets `_notifiers` and pushes through it.
    """

    _notifiers: dict[str, ParticipantNotifier]

    def watch(self, participant_id: str, notifier: ParticipantNotifier) -> None:
        """Push this participant's selections and the end of training to `notifier`."""
        self._notifiers[participant_id] = notifier

    def unwatch(self, participant_id: str, notifier: ParticipantNotifier) -> None:
        if self._notifiers.get(participant_id) is notifier:
            del self._notifiers[participant_id]

    def watched_count(self) -> int:
        """Participants the coordinator pushes news to: PB participants and held HTTP heartbeats."""
        return len(self._notifiers)


class LatencyWindow:
    """The last few values of a latency, summarised for the status page."""

    def __init__(self, size: int = 1000) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    def summary(self) -> dict[str, float | int]:
        if not self.values:
            return {"count": 0}
        ordered = sorted(self.values)
        return {
            "count": len(ordered),
            "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] * 1000, 3),
            "max_ms": round(ordered[-1] * 1000, 3),
        }


@dataclass(eq=False)
class TrainingDeadline:
    """When the participants selected together must have delivered: one timer for all of them."""

    participants: set[str]
    timer: IDelayedCall = field(init=False)


def describe_failure(failure: Failure) -> str:
    """A log-friendly reason: time-outs say so instead of printing their arguments."""
    if failure.check(TimeoutError, CancelledError):
        return "no answer in time"
    return failure.getErrorMessage() or failure.type.__name__


def new_participant_id() -> str:
    """128 random bits in the form of a UUID (the seed's ids were UUIDs; uuid4 keeps only 122 of them random).

    The id is the participant's bearer secret on every later request.
    """
    return str(uuid.UUID(bytes=secrets.token_bytes(16)))


def new_token() -> str:
    """A training token: 192 random bits."""
    return secrets.token_urlsafe(24)


class CoordinatorService(PushTargets, Service):
    """Runs federated-learning rounds for the participants that talk to it."""

    name = "coordinator"

    def __init__(
        self,
        federated_learning: FederatedLearningSettings,
        aggregator_settings: AggregatorSettings,
        aggregator: IAggregator,
        clock: IReactorTime,
        *,
        store: RoundStore | None = None,
        machine: RoundStateMachine | None = None,
        participant_ids: Callable[[], str] = new_participant_id,
        tokens: Callable[[], str] = new_token,
        limits: ParticipantLimits = ParticipantLimits(),
        repeat_interval: float = DEFAULT_REPEAT_INTERVAL,
        authenticator: ParticipantAuthenticator | None = None,
        recent_problems: RecentProblems | None = None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.settings = federated_learning
        self.aggregator_settings = aggregator_settings
        self.aggregator = aggregator
        self.clock = clock
        self.store = store
        #: A stored round counter above `rounds` (the configuration was lowered since), said at start-up.
        self._stored_beyond_rounds: int | None = None
        if machine is None:
            progress = store.load() if store is not None else RoundProgress(round=0)
            rounds = federated_learning.rounds
            if progress.round > rounds:
                self._stored_beyond_rounds = progress.round
            machine = RoundStateMachine(federated_learning.round_rules, round=min(progress.round, rounds))
        self.machine = machine
        self._round_counter = RoundCounterWriter(store, clock)
        self.limits = limits
        #: Floods of one kind of event (expiries, refusals) in one line per interval with a count.
        self.events = RepeatedEventLog(log, clock, repeat_interval)
        #: The credentials a rendez-vous needs (`participants.authentication`); None: anyone may join.
        self.authenticator = authenticator
        #: The credential each known participant joined with, checked again at its heartbeats.
        self._enrolled_with: dict[str, Credential] = {}
        self._new_participant_id = participant_ids
        self._new_token = tokens
        self._heartbeat_timers: dict[str, IDelayedCall] = {}
        #: Each selected participant's training deadline, shared by those selected together.
        self._training_timers: dict[str, TrainingDeadline] = {}
        #: Selection pushes not sent yet (a large selection is pushed over several reactor turns).
        self._pending_pushes: deque[tuple[str, int]] = deque()
        self._pushing: IDelayedCall | None = None
        self._tokens: dict[str, str] = {}
        self._admitting: dict[str, str] = {}
        self._aggregation: Deferred[None] | None = None
        #: Aggregations failed in a row, and the wait before the round runs again (`aggregation_retry_delay`).
        self._failed_aggregations = 0
        self._repeat_timer: IDelayedCall | None = None
        self._notifiers: dict[str, ParticipantNotifier] = {}
        self._selected_at: dict[str, float] = {}
        #: Seconds from a participant's selection to its start-training request.
        self.start_latency = LatencyWindow()
        self.history = RoundHistory(clock)
        #: The daemon's last warnings and errors (`tap` registers it as a log observer); None: not shown.
        self.recent_problems = recent_problems
        #: Counters and histograms of its events; its collector reads the round and participants at scrape time.
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.metrics.watch(self)
        #: The checks of a rendez-vous before it changes anything (rate, credential, max_known).
        self.gate = RendezVousGate(limits, clock, authenticator, self.metrics, self.events)

    # -- life cycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.recent_problems is not None:
            globalLogPublisher.addObserver(self.recent_problems)
        if self._stored_beyond_rounds is not None and self.store is not None:
            log.warn(
                "{path} records {stored} aggregated rounds, more than rounds: {rounds} in the configuration: "
                "training is complete (remove the file to train anew)",
                path=self.store.path,
                stored=self._stored_beyond_rounds,
                rounds=self.settings.rounds,
            )
        log.info(
            "coordinator ready: round {round} of {rounds}, {reason}",
            round=self.machine.round,
            rounds=self.settings.rounds,
            reason=self.machine.waiting_reason(),
        )

    def stopService(self) -> Deferred[None] | None:
        for timer in self._heartbeat_timers.values():
            if timer.active():
                timer.cancel()
        self._heartbeat_timers.clear()
        for deadline in {id(deadline): deadline for deadline in self._training_timers.values()}.values():
            if deadline.timer.active():
                deadline.timer.cancel()
        self._training_timers.clear()
        if self._pushing is not None and self._pushing.active():
            self._pushing.cancel()
        self._pushing = None
        self._round_counter.stop()
        self.events.stop()
        aggregation, self._aggregation = self._aggregation, None
        if aggregation is not None:
            aggregation.cancel()
        if self._repeat_timer is not None and self._repeat_timer.active():
            self._repeat_timer.cancel()
        self._repeat_timer = None
        if self.recent_problems is not None:
            globalLogPublisher.removeObserver(self.recent_problems)
        return super().stopService()

    # -- participant operations -------------------------------------------

    def rendez_vous(
        self,
        participant_id: str | None = None,
        source: str | None = None,
        enrolment_token: str | None = None,
        token_hint: str = "Authorization: Bearer <token>",
        certificate: bytes | None = None,
    ) -> RendezVousAnswer:
        """Register a participant (a new id unless a PB participant brings its own).

        Refused (`RateLimited`, `Refusal`) beyond the allowance of its source
        address, without a credential when authentication is on (a listed
        enrolment token, or the fingerprint `certificate` of a client
        certificate the listener verified), or beyond `participants.max_known`,
        with nothing changed: anyone may ask, and each participant costs
        memory and a timer for as long as it heartbeats. The rate limit
        comes first: a flood of guesses is refused before any token is
        looked at. `token_hint` says, in the refusal, where the token goes
        (the edges differ).
        """
        known = participant_id is not None and self.machine.state_of(participant_id) is not None
        credential = self.gate.check(source, enrolment_token, token_hint, certificate, known, self.machine.known_count())
        if participant_id is None:
            participant_id = self._new_participant_id()
        return RendezVousAnswer(participant_id=participant_id, ok=self._join(participant_id, credential))

    def _join(self, participant_id: str, credential: Credential | None) -> bool:
        """The state machine's rendez-vous of a participant its checks let in; whether it was accepted."""
        result = self.machine.rendez_vous(participant_id)
        if result.accepted:
            self.metrics.rendez_vous_accepted()
            self._arm_heartbeat_timer(participant_id)
            if credential is not None:
                self._enrolled_with[participant_id] = credential
            log.debug("rendez-vous of {participant}", participant=participant_id)
        self._apply(result.effects)
        return result.accepted

    def _revoked(self, participant_id: str) -> Credential | None:
        """The credential `participant_id` joined with if it is no longer accepted."""
        credential = self._enrolled_with.get(participant_id)
        if (
            credential is not None
            and participant_id in self._heartbeat_timers
            and self.authenticator is not None
            and not self.authenticator.still_valid(credential)
        ):
            return credential
        return None

    def _drop_revoked(self, participant_id: str, credential: Credential) -> None:
        """Forget a participant whose credential was revoked, as if its heartbeats had stopped.

        A result it delivered in this round still counts (as that of a
        participant that stopped after delivering); it is not selected again.
        """
        self._forget(participant_id, "credential_revoked", "{participant} dropped: its {credential} was revoked", credential=credential.kind.value)

    def heartbeat(self, participant_id: str) -> HeartbeatAnswer:
        """The state machine's answer, except `stand_by` for a participant already training.

        A legacy participant applies a heartbeat answer that was in flight
        during its upload only after the upload's 200: a `round` there would
        make it train the same round again. Once it holds its token it has
        nothing to learn from `round`, so it is told `stand_by` until its
        result is in (or its selection ends).

        A participant whose enrolment token or client certificate was revoked
        is dropped here, as one whose heartbeats stopped would be, and
        answered `reject`.
        """
        self.metrics.heartbeat()
        revoked = self._revoked(participant_id)
        if revoked is not None:
            self._drop_revoked(participant_id, revoked)
        timer = self._heartbeat_timers.get(participant_id)
        if timer is not None:
            timer.reset(self.settings.heartbeat_timeout)
        answer = self.machine.heartbeat(participant_id)
        if answer.state is HeartbeatState.ROUND and participant_id in self._tokens:
            return HeartbeatAnswer(HeartbeatState.STAND_BY)
        return answer

    def may_hold_heartbeat(self, participant_id: str, answer: HeartbeatAnswer) -> bool:
        """Whether a heartbeat answered `stand_by` may wait for news (see http_api.HeldHeartbeat).

        Only a known participant between two trainings (waiting, or done with
        this round) that no one else pushes news to: one holding a token must
        keep being told `stand_by` at once.
        """
        held = (
            answer.state is HeartbeatState.STAND_BY
            and participant_id not in self._tokens
            and participant_id not in self._notifiers
            and self.machine.state_of(participant_id) in (ParticipantState.WAITING, ParticipantState.DONE)
        )
        if held:
            self.metrics.heartbeat_held()
        return held

    def start_training(self, participant_id: str) -> Deferred[StartTrainingAnswer]:
        """Admit a selected participant at the aggregator, then hand it the URL and token.

        The request is held while the aggregator link is down, for at most
        `aggregator.admit_timeout` seconds, because a legacy participant that
        is told `ok: false` right after a `round` heartbeat crashes.
        """
        if not self.machine.may_start_training(participant_id):
            return succeed(START_TRAINING_REFUSED)
        selected_at = self._selected_at.pop(participant_id, None)
        if selected_at is not None:
            waited = self.clock.seconds() - selected_at
            self.start_latency.add(waited)
            self.metrics.started_training(waited)
        round_number = self.machine.round
        log.debug("{participant} asks to start training: admitting it at the aggregator", participant=participant_id)
        token = self._new_token()
        self._admitting[participant_id] = token
        admitting = self.aggregator.admit(participant_id, token, round_number)
        admitting.addTimeout(self.aggregator_settings.admit_timeout, self.clock)

        def admitted(_: object) -> StartTrainingAnswer:
            if not (self.machine.may_start_training(participant_id) and self.machine.round == round_number):
                return START_TRAINING_REFUSED
            self._tokens[participant_id] = token
            log.debug("{participant} admitted: answering its start of training", participant=participant_id)
            url = self.aggregator.url_for(participant_id) or self.aggregator_settings.url
            return StartTrainingAnswer(ok=True, url=url, token=token)

        def not_admitted(failure: Failure) -> StartTrainingAnswer:
            log.warn(
                "start training refused to {participant}: the aggregator did not admit it ({error})",
                participant=participant_id,
                error=describe_failure(failure),
            )
            # It may know better (e.g. it finished an aggregation after we gave up on it).
            self.sync_aggregator()
            return START_TRAINING_REFUSED

        def settled(answer: StartTrainingAnswer) -> StartTrainingAnswer:
            if self._admitting.get(participant_id) == token:
                del self._admitting[participant_id]
            return answer

        admitting.addCallbacks(admitted, not_admitted)
        admitting.addCallback(settled)
        return admitting

    def start_training_unanswered(self, participant_id: str, token: str) -> None:
        """The participant hung up before it got `token`: its heartbeats say `round` again."""
        if self._tokens.get(participant_id) == token:
            del self._tokens[participant_id]

    def end_training(self, participant_id: str, token: str, success: bool) -> bool:
        """Record the aggregator's verdict on an upload; False if it is stale or unknown.

        The aggregator answers the participant's upload only after this
        returns True, so the participant's next heartbeat cannot say `round`
        for a round it already delivered.
        """
        expected = self._tokens.get(participant_id)
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            log.warn("end of training for {participant} with a stale or unknown token", participant=participant_id)
            return False
        effects = self.machine.end_training(participant_id, success)
        if not effects:
            return False
        self._apply(effects)
        return True

    def admitted_tokens(self) -> dict[str, str]:
        """The tokens valid now, including those still being admitted (re-sent after a reconnect)."""
        return {**self._tokens, **self._admitting}

    def sync_view(self) -> tuple[int, list[str] | None, dict[str, str]]:
        """What a sync tells the aggregator now: the round, the results that count (None while aggregating), the tokens."""
        if self.machine.phase is Phase.AGGREGATING:
            done: list[str] | None = None
        else:
            done = [
                *self.machine.participants_in(ParticipantState.DONE),
                *self.machine.participants_in(ParticipantState.DONE_INACTIVE),
            ]
        return self.machine.round, done, self.admitted_tokens()

    def sync_aggregator(self) -> None:
        """Line the aggregator up with this round: after it (re)attached or a round restarted.

        The aggregator answers with its model version and the counted
        results it lacks: a newer model means an aggregation finished
        unheard (catch up); missing results mean the round must run again.
        """
        if not self.aggregator.is_attached():
            return  # the next attachment syncs
        round_number, done, admitted = self.sync_view()
        syncing = self.aggregator.sync(round_number, done, admitted)
        syncing.addTimeout(self.aggregator_settings.admit_timeout, self.clock)

        def synced(answer: dict[str, Any]) -> None:
            model_round = int(answer["model_round"])
            missing = list(answer["missing"])
            if self.machine.round != round_number:
                return  # the round moved on meanwhile; that move syncs again
            if model_round > round_number:
                if self._round_counter.holding:
                    return  # the round waits for its counter; once written, the machine moves on
                log.warn(
                    "the aggregator already aggregated up to round {round}: catching up",
                    round=model_round - 1,
                )
                caught_up = RoundProgress(round=min(model_round, self.settings.rounds))
                self._round_counter.write_then(caught_up, lambda: self._catch_up(model_round))
            elif missing:
                self.metrics.round_repeated("results_missing")
                log.warn(
                    "the aggregator lost {count} counted result(s) of round {round}: the round runs again",
                    count=len(missing),
                    round=round_number,
                )
                self._apply(self.machine.repeat_round())

        def failed(failure: Failure) -> None:
            log.warn("could not synchronise with the aggregator: {error}", error=describe_failure(failure))

        syncing.addCallbacks(synced, failed)

    def shard_lost(self, name: str) -> None:
        """An aggregator shard holding participants of this round is gone: the round runs again without it.

        Its participants' results may be lost with it; running the round
        again (everyone back to waiting, the other shards dropping this
        attempt's results at the sync) counts none of them twice.
        """
        if self.machine.phase is not Phase.TRAINING:
            return  # an aggregation under way fails on the lost link, and the round runs again then
        log.warn("aggregator shard {name} was lost mid-round: round {round} runs again", name=name, round=self.machine.round)
        self.metrics.round_repeated("shard_lost")
        self._apply(self.machine.repeat_round())

    def _catch_up(self, model_round: int) -> None:
        self._apply(self.machine.resume_at(model_round))
        self.sync_aggregator()

    def status(self) -> dict[str, Any]:
        counters = self.machine.counters()
        return {
            "round": self.machine.round,
            "rounds": self.settings.rounds,
            "phase": self.machine.phase.value,
            "minimum_participants": self.settings.round_rules.minimum_participants,
            "participants": {
                "waiting": counters.waiting,
                "selected": counters.selected,
                "done": counters.done,
                "done_inactive": counters.done_inactive,
                "ignored": counters.ignored,
            },
            "waiting_for": self._round_counter.waiting_reason() or self.machine.waiting_reason(),
            "aggregator_attached": self.aggregator.is_attached(),
            # With aggregator.shards above 1: each attached shard, its model's round and its participants.
            "aggregator_shards": self.aggregator.attached_shards(),
            # Participants the coordinator pushes news to: PB participants and held HTTP heartbeats.
            "watched_participants": self.watched_count(),
            "selection_to_start_training": self.start_latency.summary(),
            # Null unless a round counter could not be written (see docs/rounds.rst, Persistence).
            "state_write_failure": self._round_counter.report(),
            "finished_rounds": self.history.finished(),
            "seconds_since_last_aggregation": self.history.seconds_since_last_aggregation(),
            "recent_problems": [] if self.recent_problems is None else self.recent_problems.status(),
        }

    # -- timers and effects --------------------------------------------------

    def _arm_heartbeat_timer(self, participant_id: str) -> None:
        timer = self._heartbeat_timers.get(participant_id)
        if timer is not None and timer.active():
            timer.reset(self.settings.heartbeat_timeout)
            return
        self._heartbeat_timers[participant_id] = self.clock.callLater(
            self.settings.heartbeat_timeout, self._heartbeat_expired, participant_id
        )

    def _heartbeat_expired(self, participant_id: str) -> None:
        self.metrics.heartbeat_timed_out()
        self._forget(participant_id, "heartbeat_expired", "no heartbeat from {participant} for {timeout} s", timeout=self.settings.heartbeat_timeout)

    def _forget(self, participant_id: str, kind: str, message: str, **fields: Any) -> None:
        """Drop a participant as one whose heartbeats stopped: its timer, a line (one per flood of `kind`), the state machine."""
        timer = self._heartbeat_timers.pop(participant_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.events.emit(kind, LogLevel.info, message, participant=participant_id, **fields)
        self._apply(self.machine.heartbeat_timed_out(participant_id))

    def _training_expired(self, deadline: TrainingDeadline) -> None:
        for participant_id in list(deadline.participants):
            if self._training_timers.get(participant_id) is not deadline:
                continue
            del self._training_timers[participant_id]
            deadline.participants.discard(participant_id)
            self.metrics.training_timed_out()
            self.events.emit(
                "training_expired",
                LogLevel.warn,
                "{participant} delivered nothing within training_timeout ({timeout} s): ignored for this round",
                participant=participant_id,
                timeout=self.settings.training_timeout,
            )
            self._apply(self.machine.training_timed_out(participant_id))

    def _cancel_training_timer(self, participant_id: str) -> None:
        deadline = self._training_timers.pop(participant_id, None)
        if deadline is None:
            return
        deadline.participants.discard(participant_id)
        if not deadline.participants and deadline.timer.active():
            deadline.timer.cancel()

    def _push_selections(self) -> None:
        """Tell waiting notifiers of their selection, at most `PUSHES_PER_TURN` now, the rest on the next turns."""
        self._pushing = None
        for _ in range(min(PUSHES_PER_TURN, len(self._pending_pushes))):
            participant_id, round_number = self._pending_pushes.popleft()
            notifier = self._notifiers.get(participant_id)
            if notifier is not None and self.machine.round == round_number:
                notifier.selected(round_number)
        if self._pending_pushes:
            self._pushing = self.clock.callLater(0, self._push_selections)

    def _apply(self, effects: tuple[Effect, ...]) -> None:
        for effect in effects:
            match effect:
                case ParticipantsSelected(participant_ids=ids, round=round_number):
                    # One timer for all of them: selecting 30,000 took 0.2 s with a timer each.
                    now = self.clock.seconds()
                    deadline = TrainingDeadline(set(ids))
                    deadline.timer = self.clock.callLater(self.settings.training_timeout, self._training_expired, deadline)
                    notifiers = self._notifiers
                    for participant_id in ids:
                        self._training_timers[participant_id] = deadline
                        self._selected_at[participant_id] = now
                        if participant_id in notifiers:
                            self._pending_pushes.append((participant_id, round_number))
                    self.history.selected()
                    self.metrics.selected(len(ids))
                    log.info("selected {count} participant(s) for round {round}", count=len(ids), round=round_number)
                    if self._pushing is None and self._pending_pushes:
                        # From the next reactor turn: the call that made the selection (the rendez-vous that
                        # completed the round, a result's report) is answered first, not behind every push.
                        self._pushing = self.clock.callLater(0, self._push_selections)
                case SelectionEnded(participant_id=participant_id, reason=reason):
                    self._cancel_training_timer(participant_id)
                    self._tokens.pop(participant_id, None)
                    self._selected_at.pop(participant_id, None)
                    log.debug("{participant} left the round: {reason}", participant=participant_id, reason=reason.value)
                case ParticipantRemoved(participant_id=participant_id):
                    timer = self._heartbeat_timers.pop(participant_id, None)
                    if timer is not None and timer.active():
                        timer.cancel()
                    self._notifiers.pop(participant_id, None)
                    self._enrolled_with.pop(participant_id, None)
                case AggregationRequested(round=round_number, participant_ids=counted):
                    self.history.aggregation_requested(len(counted))
                    self.metrics.aggregation_requested(len(counted))
                    self._tokens.clear()
                    self._request_aggregation(round_number, list(counted))
                case RoundCompleted(round=round_number):
                    # Its counter was written before the machine was told (RoundCounterWriter).
                    self.metrics.round_ended(self.history.ended(round_number, aggregated=True).duration_s, aggregated=True)
                    log.info("round {round} aggregated", round=round_number)
                case RoundRepeated(round=round_number):
                    self.metrics.round_ended(self.history.ended(round_number, aggregated=False).duration_s, aggregated=False)
                    log.warn("round {round} runs again", round=round_number)
                    self._tokens.clear()
                    self.sync_aggregator()
                case TrainingCompleted(rounds=rounds):
                    log.info("training complete after {rounds} rounds", rounds=rounds)
                    notifiers, self._notifiers = self._notifiers, {}
                    for notifier in notifiers.values():
                        notifier.finished()

    def _repeat_round(self, round_number: int) -> None:
        """Run the round again after a failed aggregation, unless a catch-up moved it on meanwhile."""
        self._repeat_timer = None
        if self.machine.phase is Phase.AGGREGATING and self.machine.round == round_number:
            self.metrics.round_repeated("aggregation_failed")
            self._apply(self.machine.end_aggregation(False))

    def _request_aggregation(self, round_number: int, counted: list[str]) -> None:
        log.info("round {round} complete: asking the aggregator to aggregate", round=round_number)
        aggregation = self.aggregator.aggregate(round_number, counted)
        aggregation.addTimeout(self.aggregator_settings.aggregation_timeout, self.clock)
        self._aggregation = aggregation

        def finished(_: object) -> None:
            if self._aggregation is not aggregation:
                return  # the service stopped meanwhile
            self._aggregation = None
            self._failed_aggregations = 0
            if self.machine.phase is not Phase.AGGREGATING or self.machine.round != round_number:
                return  # a catch-up moved the round on meanwhile
            self._round_counter.write_then(
                RoundProgress(round=round_number + 1), lambda: self._apply(self.machine.end_aggregation(True))
            )

        def failed(failure: Failure) -> None:
            if self._aggregation is not aggregation:
                return
            self._aggregation = None
            self._failed_aggregations += 1
            delay = aggregation_retry_delay(self._failed_aggregations)
            log.warn(
                "aggregation of round {round} failed: {error}; the round runs again in {delay:g} s",
                round=round_number, error=describe_failure(failure), delay=delay,
            )
            self._repeat_timer = self.clock.callLater(delay, self._repeat_round, round_number)

        aggregation.addCallbacks(finished, failed)
