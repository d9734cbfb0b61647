"""One coordinator process of several sharing a training through Redis: what the front ends talk to.

`ClusterCoordinator` has the methods the HTTP API and the PB listener call
on `CoordinatorService` (rendez_vous, heartbeat, start_training, watch,
status, ...), so they serve participants the same way in every process.
Inside, the process is either

- the leader (it holds the lease, `lease.py`): a `LeaderService` runs the
  rounds exactly as a single coordinator does, its changes written to
  Redis before they are shown (`state_mirror.py`), the followers' messages
  popped from the inbox (`forwarding.py`), expired heartbeat deadlines
  taken from the sorted set; or
- a follower: heartbeats answered from the replica (`replica.py`) and
  their deadlines written in batches (`deadlines.py`), rendez-vous checked
  here and handed over, start-training requests forwarded and answered
  with the leader's answer.

Every process applies the leader's events to its replica and pushes the
news to its own participants. A follower that wins the lease builds the
leader from Redis; a leader that cannot renew its lease stops at once
(`exit_process`), to be restarted by its supervisor as a follower.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from xaind.coordinator.aggregator_link import IAggregator
from xaind.coordinator.authentication import ParticipantAuthenticator
from xaind.coordinator.cluster.connection import POLL_SECONDS, PollLoop, RedisConnection
from xaind.coordinator.cluster.deadlines import HeartbeatDeadlines
from xaind.coordinator.cluster.forwarding import Forwarder, Inbox
from xaind.coordinator.cluster.keys import Keys
from xaind.coordinator.cluster.leader import LeaderService
from xaind.coordinator.cluster.lease import LeaderLease
from xaind.coordinator.cluster.replica import News, Replica
from xaind.coordinator.cluster.scripts import POP_EXPIRED
from xaind.coordinator.cluster.settings import RedisStateSettings, shown_url
from xaind.coordinator.cluster.state_mirror import Snapshot, StateMirror, TrackedRoundStateMachine, decode_credential, encode_credential, load_snapshot
from xaind.coordinator.admission import RendezVousGate
from xaind.coordinator.metrics import CoordinatorMetrics
from xaind.coordinator.rounds import HeartbeatAnswer, HeartbeatState, ParticipantState, Phase
from xaind.coordinator.service import (
    START_TRAINING_REFUSED,
    LatencyWindow,
    ParticipantNotifier,
    PushTargets,
    RendezVousAnswer,
    StartTrainingAnswer,
    describe_failure,
    new_participant_id,
)
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings, ParticipantLimits
from xaind.logs import DEFAULT_REPEAT_INTERVAL, RepeatedEventLog, get_logger
from xaind.recent_problems import RecentProblems

log = get_logger("xaind.coordinator.cluster")

#: Exit status of a leader that lost its lease (EX_SOFTWARE): its supervisor restarts it as a follower.
LOST_LEASE_EXIT = 70
#: Expired heartbeat deadlines the leader takes out of Redis in one scan.
EXPIRED_PER_SCAN = 1000
#: A forwarded start of training answered later than this before its `answer_by` gives its token up: the
#: reply might reach the follower after it stopped waiting, leaving a token its participant never heard of.
REPLY_MARGIN_SECONDS = 0.5
#: A deadline counts as passed only this long after it: followers write theirs in batches (deadlines.py).
EXPIRY_GRACE_SECONDS = 0.2


def new_process_id() -> str:
    """This process among the coordinators: host, pid, and randomness (a restarted pid is another process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def exit_process(status: int) -> None:
    """Stop at once: no shutdown trigger may run on stale leadership."""
    os._exit(status)


class ClusterCoordinator(PushTargets, Service):
    """The coordinator as the front ends see it, leader or follower (see the module docstring)."""

    name = "coordinator"

    def __init__(
        self,
        redis_state: RedisStateSettings,
        federated_learning: FederatedLearningSettings,
        aggregator_settings: AggregatorSettings,
        aggregator: IAggregator,
        clock: IReactorTime,
        *,
        limits: ParticipantLimits = ParticipantLimits(),
        repeat_interval: float = DEFAULT_REPEAT_INTERVAL,
        authenticator: ParticipantAuthenticator | None = None,
        recent_problems: RecentProblems | None = None,
        metrics: CoordinatorMetrics | None = None,
        connection: RedisConnection | None = None,
        process_id: str | None = None,
        exit: Callable[[int], None] = exit_process,
    ) -> None:
        self.redis_state = redis_state
        self.settings = federated_learning
        self.aggregator_settings = aggregator_settings
        self.aggregator = aggregator
        self.clock = clock
        self.limits = limits
        self.repeat_interval = repeat_interval
        self.authenticator = authenticator
        self.recent_problems = recent_problems
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.process_id = process_id or new_process_id()
        self._exit = exit
        self.keys = Keys(redis_state.prefix)
        self.connection = connection if connection is not None else RedisConnection(redis_state, clock)
        self.events = RepeatedEventLog(log, clock, repeat_interval)
        self.gate = RendezVousGate(limits, clock, authenticator, self.metrics, self.events)
        self.replica = Replica()
        self.deadlines = HeartbeatDeadlines(self.connection, self.keys, clock)
        self.forwarder = Forwarder(self.connection, self.keys, self.process_id)
        self.lease = LeaderLease(self.connection, self.keys, self.process_id, redis_state.lease_seconds, clock, self._elected, self._lost)
        self.leader: LeaderService | None = None
        self.inbox: Inbox | None = None
        self._expiry: LoopingCall | None = None
        self._pop_expired = self.connection.client.register_script(POP_EXPIRED)
        self._pubsub: Any = None
        self._events_loop: PollLoop[Any] | None = None
        self._reloading = False
        self._notifiers: dict[str, ParticipantNotifier] = {}
        self.start_latency = LatencyWindow()

    # -- life cycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.recent_problems is not None:
            globalLogPublisher.addObserver(self.recent_problems)
        self.connection.start()
        self.forwarder.start()
        log.info(
            "coordinator {process} sharing its state in Redis at {url} (keys {prefix}*): following until it holds the lease",
            process=self.process_id,
            url=shown_url(self.redis_state.url),
            prefix=self.redis_state.prefix,
        )
        self.connection.run(self._subscribe_and_load).addCallbacks(self._loaded, self._not_loaded)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.recent_problems is not None:
            globalLogPublisher.removeObserver(self.recent_problems)
        self.events.stop()
        self.forwarder.stop()
        if self._events_loop is not None:
            self._events_loop.stop()
        if self.inbox is not None:
            self.inbox.stop()
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        leader, self.leader = self.leader, None
        if leader is not None:
            leader.stopService()
        self.deadlines.close()
        stopping = self.lease.stop()

        def close(_: object) -> None:
            if self._pubsub is not None:
                self._pubsub.close()
            self.connection.stop()

        return stopping.addBoth(close)

    def _subscribe_and_load(self) -> Snapshot:
        """Subscribe first, then read: an event in between is in the subscription, applied if newer."""
        pubsub = self.connection.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.events)
        self._pubsub = pubsub
        return load_snapshot(self.connection, self.keys)

    def _loaded(self, snapshot: Snapshot) -> None:
        if not self.running:
            return
        self.replica.load(snapshot, self.settings.rounds)
        self._events_loop = PollLoop(self.connection, "the leader's events", lambda: self._pubsub.get_message(timeout=POLL_SECONDS), self._message)
        self._events_loop.start()
        self.lease.start()

    def _not_loaded(self, failure: Failure) -> None:
        log.error("cannot read the shared state from Redis at {url}: {error}", url=shown_url(self.redis_state.url), error=failure.getErrorMessage())
        self._exit(1)

    # -- events --------------------------------------------------------------

    def _message(self, message: Any) -> None:
        if not message or message.get("type") != "message":
            return
        try:
            event = json.loads(message["data"])
        except (ValueError, TypeError):
            log.warn("dropped an unreadable event")
            return
        self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        if self._reloading or not self.replica.loaded:
            return
        if self.replica.needs_reload(event):
            log.info("missed events of the leader (at {have}, got {seq}): reading the state again", have=self.replica.seq, seq=event["seq"])
            self._reloading = True
            self.connection.run(load_snapshot, self.connection, self.keys).addCallbacks(self._reloaded, self._reload_failed)
            return
        news = self.replica.apply(event)
        if news is not None:
            self._push(news)

    def _reloaded(self, snapshot: Snapshot) -> None:
        self._reloading = False
        self.replica.load(snapshot, self.settings.rounds)

    def _reload_failed(self, failure: Failure) -> None:
        self._reloading = False
        log.warn("could not read the state again: {error}", error=failure.getErrorMessage())

    def _push(self, news: News) -> None:
        for participant_id in news.removed:
            self._notifiers.pop(participant_id, None)
        for participant_id in news.selected:
            notifier = self._notifiers.get(participant_id)
            if notifier is not None:
                notifier.selected(news.round)
        if news.finished:
            notifiers, self._notifiers = self._notifiers, {}
            for notifier in notifiers.values():
                notifier.finished()

    # -- leadership ----------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.leader is not None

    @property
    def accepts_aggregator(self) -> bool:
        """Aggregators log in at the leader only (it alone talks to them)."""
        return self.leader is not None

    def _elected(self) -> None:
        self.connection.run(load_snapshot, self.connection, self.keys).addCallbacks(self._take_over, self._not_loaded)

    def _take_over(self, snapshot: Snapshot) -> Deferred[None] | None:
        if not self.running or self.lease.lost:
            return None
        rules = self.settings.round_rules
        if snapshot.written:
            machine = TrackedRoundStateMachine.restored(rules, snapshot.round, snapshot.phase, snapshot.states)
        else:
            machine = TrackedRoundStateMachine(rules, round=0)
        leader = LeaderService(
            self.settings,
            self.aggregator_settings,
            self.aggregator,
            self.clock,
            machine=machine,
            limits=self.limits,
            repeat_interval=self.repeat_interval,
            authenticator=self.authenticator,
            metrics=self.metrics,
            deadlines=self.deadlines,
        )
        leader.restore(snapshot)
        mirror = StateMirror(self.connection, self.keys, leader, snapshot.seq, self._event)
        mirror.seed_tokens(snapshot.tokens)
        leader.mirror = mirror
        known = machine.known_ids()
        due = self.clock.seconds() + self.settings.heartbeat_timeout

        def keep_deadlines() -> None:
            """Participants whose deadline no one wrote (a follower died before its batch) get one now."""
            if known:
                self.connection.client.zadd(self.keys.deadlines, {participant_id: due for participant_id in known}, nx=True)

        def lead(_: object) -> None:
            if not self.running or self.lease.lost:
                return
            self.leader = leader
            leader.startService()
            log.info(
                "leading from the shared state: round {round}, phase {phase}, {count} participant(s) known",
                round=machine.round,
                phase=machine.phase.value,
                count=len(known),
            )
            mirror.changed()
            self.inbox = Inbox(self.connection, self.keys, self._forwarded)
            self.inbox.start()
            self._expiry = LoopingCall(self._expire)
            self._expiry.clock = self.clock
            self._expiry.start(min(1.0, self.settings.heartbeat_timeout / 4), now=False)

        return self.connection.run(keep_deadlines).addCallbacks(lead, self._not_loaded)

    def _lost(self, reason: str) -> None:
        log.critical(
            "lost the leader's lease ({reason}): stopping at once so as never to act on stale leadership; "
            "restarted, this process follows the new leader",
            reason=reason,
        )
        self._exit(LOST_LEASE_EXIT)

    def _expire(self) -> None:
        leader = self.leader
        if leader is None:
            return
        now = self.clock.seconds() - EXPIRY_GRACE_SECONDS
        popping = self.connection.run(self._pop_expired, keys=[self.keys.deadlines], args=[now, EXPIRED_PER_SCAN])

        def expired(participant_ids: list[str]) -> None:
            if self.leader is leader and participant_ids:
                leader.expire_due(list(participant_ids))

        popping.addCallbacks(expired, lambda failure: log.warn("could not read expired heartbeats: {error}", error=failure.getErrorMessage()))

    def _forwarded(self, message: dict[str, Any]) -> None:
        """A follower's message, popped from the inbox (the leader only)."""
        leader = self.leader
        if leader is None or self.inbox is None:
            return
        inbox = self.inbox
        kind = message.get("kind")
        participant_id = str(message.get("id", ""))
        log.debug("from the inbox: {kind} of {participant}", kind=kind, participant=participant_id)
        if kind == "rendez_vous":
            credential = message.get("credential")
            leader.join_forwarded(participant_id, decode_credential(credential) if credential else None)
        elif kind == "start_training":
            answer_by = float(message.get("answer_by", math.inf))
            if self.clock.seconds() > answer_by:
                log.debug("a start of training of {participant} nobody waits for any more: not admitted", participant=participant_id)
                return
            answering = self._lead_start_training(leader, participant_id)
            answering.addErrback(lambda failure: START_TRAINING_REFUSED)
            answering.addCallback(self._answer_forwarded_start, leader, inbox, message, participant_id, answer_by)
        elif kind == "start_training_unanswered":
            self._lead_unanswered(leader, participant_id, str(message.get("token", "")))
        else:
            log.warn("dropped a message of unknown kind from the inbox")

    def _answer_forwarded_start(
        self, answer: StartTrainingAnswer, leader: LeaderService, inbox: Inbox, message: dict[str, Any], participant_id: str, answer_by: float
    ) -> None:
        """Reply to the follower that asked; a token nobody waits for any more is given up at once.

        Otherwise the participant, never told its token, would be answered
        `stand_by` (it holds one) until its training timeout.
        """
        if answer.ok and answer.token is not None and self.clock.seconds() > answer_by - REPLY_MARGIN_SECONDS:
            log.debug("the start of training of {participant} was answered too late: its token is given up", participant=participant_id)
            self._lead_unanswered(leader, participant_id, answer.token)
            return
        inbox.reply(message, {"ok": answer.ok, "url": answer.url, "token": answer.token})

    # -- participant operations ---------------------------------------------

    def rendez_vous(
        self,
        participant_id: str | None = None,
        source: str | None = None,
        enrolment_token: str | None = None,
        token_hint: str = "Authorization: Bearer <token>",
        certificate: bytes | None = None,
    ) -> Deferred[RendezVousAnswer]:
        """At the leader as a single coordinator; at a follower checked here and handed over.

        Answered once the participant is in Redis (its state or its heartbeat
        deadline), so that its first heartbeat, whichever process it reaches,
        finds it. A refusal is raised at once, as by the service.
        """
        leader = self.leader
        if leader is not None:
            answer = leader.rendez_vous(participant_id, source, enrolment_token, token_hint, certificate)
            if not answer.ok or leader.mirror is None:
                return succeed(answer)
            return leader.mirror.flushed().addCallback(lambda _: answer)
        known = participant_id is not None and self.replica.state_of(participant_id) is not None
        credential = self.gate.check(source, enrolment_token, token_hint, certificate, known, self.replica.known_count())
        if participant_id is None:
            participant_id = new_participant_id()
        if self.replica.phase is Phase.COMPLETE:
            return succeed(RendezVousAnswer(participant_id=participant_id, ok=False))
        self.replica.joined(participant_id)
        self.metrics.rendez_vous_accepted()
        message = {"kind": "rendez_vous", "id": participant_id, "credential": None if credential is None else encode_credential(credential)}
        due = self.clock.seconds() + self.settings.heartbeat_timeout
        answer = RendezVousAnswer(participant_id=participant_id, ok=True)

        def not_handed(failure: Failure) -> RendezVousAnswer:
            # Its heartbeats find it nowhere and are answered reject: the participant joins again.
            log.warn("could not hand a rendez-vous to the leader: {error}", error=failure.getErrorMessage())
            return answer

        return self.forwarder.send(message, deadline=(participant_id, due)).addCallbacks(lambda _: answer, not_handed)

    def heartbeat(self, participant_id: str) -> HeartbeatAnswer | Deferred[HeartbeatAnswer]:
        """Answered from the leader's machine or the replica; a `reject` is checked in Redis first.

        A participant that joined at another process a moment ago may not be
        in this process's view yet (the leader has not popped its rendez-vous,
        or the event has not arrived): its heartbeat deadline, written with
        the rendez-vous, says it exists, and it is told `stand_by`.
        """
        leader = self.leader
        if leader is not None:
            answer = leader.heartbeat(participant_id)
        else:
            self.metrics.heartbeat()
            answer = self.replica.heartbeat(participant_id)
            if answer.state not in (HeartbeatState.REJECT, HeartbeatState.FINISH):
                self.deadlines.set(participant_id, self.clock.seconds() + self.settings.heartbeat_timeout)
        if answer.state is not HeartbeatState.REJECT:
            return answer
        return self._confirm_reject(participant_id)

    def _confirm_reject(self, participant_id: str) -> Deferred[HeartbeatAnswer]:
        now = self.clock.seconds()

        def look_up() -> tuple[float | None, str | None]:
            pipeline = self.connection.client.pipeline(transaction=False)
            pipeline.zscore(self.keys.deadlines, participant_id)
            pipeline.hget(self.keys.participants, participant_id)
            due, state = pipeline.execute()
            return due, state

        def answer(found: tuple[float | None, str | None]) -> HeartbeatAnswer:
            due, state = found
            if state not in (None, ParticipantState.DONE_INACTIVE.value) or (due is not None and float(due) > now):
                return HeartbeatAnswer(HeartbeatState.STAND_BY)
            return HeartbeatAnswer(HeartbeatState.REJECT)

        looking = self.connection.run(look_up)
        return looking.addCallbacks(answer, lambda failure: HeartbeatAnswer(HeartbeatState.REJECT))

    def may_hold_heartbeat(self, participant_id: str, answer: HeartbeatAnswer) -> bool:
        if participant_id in self._notifiers:
            return False
        leader = self.leader
        if leader is not None:
            return leader.may_hold_heartbeat(participant_id, answer)
        held = (
            answer.state is HeartbeatState.STAND_BY
            and participant_id not in self.replica.token_holders
            and self.replica.state_of(participant_id) in (ParticipantState.WAITING, ParticipantState.DONE)
        )
        if held:
            self.metrics.heartbeat_held()
        return held

    def start_training(self, participant_id: str) -> Deferred[StartTrainingAnswer]:
        """The leader admits and answers once the token is in Redis; a follower forwards the request."""
        leader = self.leader
        if leader is not None:
            return self._lead_start_training(leader, participant_id)
        if self.replica.state_of(participant_id) is not ParticipantState.SELECTED or self.replica.phase is not Phase.TRAINING:
            return succeed(START_TRAINING_REFUSED)
        log.debug("{participant} asks to start training: forwarded to the leader", participant=participant_id)
        asking = self.forwarder.request({"kind": "start_training", "id": participant_id}, self.aggregator_settings.admit_timeout + 1.0)

        def answered(reply: dict[str, Any]) -> StartTrainingAnswer:
            if not reply.get("ok"):
                return START_TRAINING_REFUSED
            self.replica.token_holders.add(participant_id)
            return StartTrainingAnswer(ok=True, url=reply.get("url"), token=reply.get("token"))

        def unanswered(failure: Failure) -> StartTrainingAnswer:
            log.warn("start training refused to {participant}: the leader did not answer ({error})", participant=participant_id, error=describe_failure(failure))
            return START_TRAINING_REFUSED

        return asking.addCallbacks(answered, unanswered)

    def _lead_start_training(self, leader: LeaderService, participant_id: str) -> Deferred[StartTrainingAnswer]:
        def recorded(answer: StartTrainingAnswer) -> Deferred[StartTrainingAnswer] | StartTrainingAnswer:
            if not answer.ok or leader.mirror is None:
                return answer
            return leader.mirror.flushed().addCallback(lambda _: answer)

        return leader.start_training(participant_id).addCallback(recorded)

    def start_training_unanswered(self, participant_id: str, token: str) -> None:
        leader = self.leader
        if leader is not None:
            self._lead_unanswered(leader, participant_id, token)
            return
        self.replica.token_holders.discard(participant_id)
        self.forwarder.send({"kind": "start_training_unanswered", "id": participant_id, "token": token}).addErrback(
            lambda failure: log.warn("could not tell the leader of an unanswered start of training: {error}", error=failure.getErrorMessage())
        )

    def _lead_unanswered(self, leader: LeaderService, participant_id: str, token: str) -> None:
        leader.start_training_unanswered(participant_id, token)
        if leader.mirror is not None:
            leader.mirror.changed()

    def end_training(self, participant_id: str, token: str, success: bool) -> Deferred[bool]:
        """The aggregator's verdict, answered once it is in Redis: a result is never lost to a takeover."""
        leader = self.leader
        if leader is None or leader.mirror is None:
            return succeed(False)
        counted = leader.end_training(participant_id, token, success)
        return leader.mirror.flushed().addCallback(lambda _: counted)

    def sync_aggregator(self) -> None:
        if self.leader is not None:
            self.leader.sync_aggregator()

    def sync_view(self) -> tuple[int, list[str] | None, dict[str, str]]:
        """The leader's view for a sync (shards log in at the leader only); round -1, matching none, elsewhere."""
        if self.leader is None:
            return -1, None, {}
        return self.leader.sync_view()

    def shard_lost(self, name: str) -> None:
        """An aggregator shard is gone (`aggregator.shards`): the leader runs the round again; shards attach only there."""
        if self.leader is not None:
            self.leader.shard_lost(name)

    def status(self) -> dict[str, Any]:
        leader = self.leader
        cluster = {"process": self.process_id, "role": "leader" if leader is not None else "follower", "prefix": self.redis_state.prefix}
        if leader is not None:
            status = leader.status()
        else:
            counters = self.replica.counters()
            status = {
                "round": self.replica.round,
                "rounds": self.settings.rounds,
                "phase": self.replica.phase.value,
                "minimum_participants": self.settings.round_rules.minimum_participants,
                "participants": counters,
                "waiting_for": "the leader (this process follows it; see the leader's /status for the details)",
                "aggregator_attached": False,
                "selection_to_start_training": self.start_latency.summary(),
                "state_write_failure": None,
                "finished_rounds": [],
                "seconds_since_last_aggregation": None,
            }
        status["watched_participants"] = self.watched_count()
        status["recent_problems"] = [] if self.recent_problems is None else self.recent_problems.status()
        status["cluster"] = cluster
        return status
