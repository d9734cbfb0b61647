"""The participant's protocol: rendez-vous, heartbeat, train when selected, until finish.

Written once on Twisted, for both transports. Heartbeats run on the reactor
while `train_round` runs in a thread, so a long training never looks like a
dead participant. Transient network errors (a daemon restarting) are retried
with capped exponential backoff for up to `retry_timeout` seconds; a
`reject` makes the participant rendez-vous again.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from xaind.logs import get_logger
from xaind.protocol import ErrorCode
from xaind.sdk.clipping import check_clip_norm, clip_update
from xaind.sdk.coordinator_client import CoordinatorClient, coordinator_client
from xaind.sdk.heartbeats import HeartbeatSchedule
from xaind.sdk.http import HttpClient, Refused, Transient
from xaind.sdk.participant import Participant, ParticipantError
from xaind.sdk.tls import load_client_certificate, load_trust_root

log = get_logger("xaind.sdk")

T = TypeVar("T")

#: Start-training attempts per round when the aggregator no longer knows a token.
TOKEN_ATTEMPTS = 3


@dataclass
class ParticipantSummary:
    """What one participant did, for tools and tests."""

    participant_id: str | None = None
    rounds_delivered: list[int] = field(default_factory=list)
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    rendez_vous: int = 0
    retries: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 0.2
    max_delay: float = 5.0
    factor: float = 2.0
    retry_timeout: float = 600.0


def run_in_daemon_thread(reactor: Any, function: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run blocking user code beside the reactor; a daemon thread never holds up Ctrl-C."""
    result: Deferred[T] = Deferred()

    def work() -> None:
        try:
            value = function(*args)
        except BaseException:  # noqa: B036 - the user's training may raise anything; it is reported, not swallowed
            failure = Failure()
            reactor.callFromThread(result.errback, failure)
        else:
            reactor.callFromThread(result.callback, value)

    threading.Thread(target=work, name="xaind-training", daemon=True).start()
    return result


class ParticipantRunner:
    def __init__(
        self,
        participant: Participant,
        coordinator: CoordinatorClient,
        http: HttpClient,
        reactor: Any,
        *,
        heartbeat_period: float = 1.0,
        retry: RetryPolicy = RetryPolicy(),
        train_in_thread: bool = True,
        keep_downloads: bool = True,
        name: str = "participant",
        clip_norm: float | None = None,
    ) -> None:
        check_clip_norm(clip_norm)
        self.participant = participant
        self.coordinator = coordinator
        self.http = http
        self.reactor = reactor
        self.heartbeat_period = heartbeat_period
        self.retry = retry
        self.train_in_thread = train_in_thread
        self.keep_downloads = keep_downloads
        self.name = name
        self.clip_norm = clip_norm
        self.summary = ParticipantSummary()
        self._participant_id: str | None = None
        self._heartbeats = HeartbeatSchedule(reactor, heartbeat_period, self._heartbeat)
        self._training_round: int | None = None
        self._pending_round: int | None = None
        self._done: Deferred[ParticipantSummary] = Deferred()
        self._failing_since: float | None = None
        self._stopped = False

    # -- life cycle ---------------------------------------------------------

    def run(self) -> Deferred[ParticipantSummary]:
        self._rendez_vous()
        return self._done

    def stop(self, failure: Failure | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._heartbeats.stop()
        if failure is None:
            self._done.callback(self.summary)
        else:
            self._done.errback(failure)

    # -- notifications (from heartbeats or pushed over PB) ----------------------

    def selected(self, round_number: int) -> None:
        # No memory of delivered rounds here: a round can rightly be trained
        # again (it was repeated, or the coordinator restarted), and the
        # coordinator never says `round` to a participant that delivered it.
        if self._stopped or self._training_round is not None:
            return
        if self._participant_id is None:
            # Pushed while our rendez-vous is still being answered: start once we know our id.
            self._pending_round = round_number
            return
        self._training_round = round_number
        log.debug("{name}: selected for round {round}", name=self.name, round=round_number)
        self.participant.on_round_started(round_number)
        self._train(round_number).addBoth(self._training_ended)

    def finished(self) -> None:
        if not self._stopped:
            log.info("{name}: training finished", name=self.name)
            self.participant.on_training_finished()
            self.stop()

    # -- steps ----------------------------------------------------------------------

    @inlineCallbacks
    def _rendez_vous(self) -> Any:
        try:
            answer = yield self._retrying("rendez-vous", lambda: self.coordinator.rendez_vous(self))
        except ParticipantError:
            self.stop(Failure())
            return
        except Refused as refusal:
            self.stop(Failure(ParticipantError(f"rendez-vous refused: {refusal.code or refusal.status}: {refusal.message}")))
            return
        self.summary.rendez_vous += 1
        self._participant_id = answer.participant_id
        pending, self._pending_round = self._pending_round, None
        self.summary.participant_id = answer.participant_id
        if not answer.ok:
            self.finished()
            return
        log.info("{name}: rendez-vous as {participant}", name=self.name, participant=answer.participant_id)
        if pending is not None:
            self.selected(pending)
        if not self._heartbeats.running:
            self._heartbeats.start()

    @inlineCallbacks
    def _heartbeat(self) -> Any:
        if self._participant_id is None or self._stopped:
            return
        try:
            beat = yield self.coordinator.heartbeat(self._participant_id)
        except Transient as problem:
            self._note_failure(problem)
            return
        except Refused as refusal:
            self.stop(Failure(ParticipantError(f"heartbeat refused: {refusal}")))
            return
        except ParticipantError:
            # A coordinator whose certificate is no longer trusted: no retry makes it so.
            self.stop(Failure())
            return
        self._failing_since = None
        if beat.state == "round" and beat.round is not None:
            self.selected(int(beat.round))
        elif beat.state == "finish":
            self.finished()
        elif beat.state == "reject":
            log.warn("{name}: the coordinator no longer knows us; rendez-vous again", name=self.name)
            self._participant_id = None
            self._rendez_vous()

    def _note_failure(self, problem: Exception) -> None:
        now = self.reactor.seconds()
        if self._failing_since is None:
            self._failing_since = now
        self.summary.retries += 1
        if now - self._failing_since > self.retry.retry_timeout:
            self.stop(Failure(ParticipantError(f"the coordinator is unreachable since {self.retry.retry_timeout:.0f} s: {problem}")))

    @inlineCallbacks
    def _train(self, round_number: int) -> Any:
        """Start, download, train, upload; a lost token (an aggregator restart) is asked for again.

        While a participant holds a token the coordinator's heartbeats say
        `stand_by`, so a refused download or upload cannot wait for the next
        `round`: it asks to start training again, a few times at most.
        """
        participant_id = self._participant_id
        assert participant_id is not None
        new_weights: np.ndarray | None = None
        samples = 0
        for _attempt in range(TOKEN_ATTEMPTS):
            url = yield self._ticket(participant_id)
            if url is None:
                return
            if new_weights is None:
                try:
                    downloaded = yield self._retrying("download", lambda: self.http.download(url, self.keep_downloads))
                except Refused as refusal:
                    log.warn("{name}: download refused ({refusal})", name=self.name, refusal=refusal)
                    continue
                log.debug("{name}: downloaded the global model ({size} bytes)", name=self.name, size=downloaded.size)
                self.summary.bytes_downloaded += downloaded.size
                self.participant.on_global_model_size(downloaded.size)
                weights = np.load(io.BytesIO(downloaded.data), allow_pickle=False) if downloaded.data else None
                if self.train_in_thread:
                    new_weights, samples = yield run_in_daemon_thread(self.reactor, self._trained, weights)
                else:
                    new_weights, samples = self._trained(weights)
                log.debug("{name}: trained; uploading", name=self.name)
            trained: np.ndarray = new_weights
            try:
                yield self._retrying("upload", lambda: self.http.upload(url, samples, trained))
            except Refused as refusal:
                if refusal.code == ErrorCode.ALREADY_ACCEPTED:
                    pass  # an earlier try went through; its answer was lost
                elif refusal.status in (404, 409):
                    log.warn("{name}: upload of round {round} refused ({refusal})", name=self.name, round=round_number, refusal=refusal)
                    continue
                else:
                    raise ParticipantError(f"the aggregator refused our result of round {round_number}: {refusal}") from None
            self.summary.bytes_uploaded += trained.nbytes
            self.summary.rounds_delivered.append(round_number)
            log.info("{name}: round {round} delivered", name=self.name, round=round_number)
            if self.coordinator.hears_selections_by_heartbeat:
                # The next round may be selected a few milliseconds from now: be listening.
                self._heartbeats.now()
            self.participant.on_round_delivered(round_number)
            return

    def _trained(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        """The participant's training, its update clipped (with `clip_norm`) in the same thread, off the reactor."""
        result = self.participant.train_round(weights)
        new_weights, samples = np.asanyarray(result[0]), int(result[1])
        if self.clip_norm is not None:
            new_weights = clip_update(new_weights, weights, self.clip_norm)
        return new_weights, samples

    @inlineCallbacks
    def _ticket(self, participant_id: str) -> Any:
        """The URL to download from and upload to, or None if the coordinator says no."""
        ticket = yield self._retrying("start training", lambda: self.coordinator.start_training(participant_id))
        log.debug("{name}: start of training answered (ok: {ok})", name=self.name, ok=ticket.ok)
        if not ticket.ok or ticket.url is None or ticket.token is None:
            log.info("{name}: start of training refused; waiting", name=self.name)
            return None
        return f"{ticket.url.rstrip('/')}/{quote(participant_id, safe='')}/{quote(ticket.token, safe='')}"

    def _training_ended(self, outcome: Any) -> None:
        self._training_round = None
        if isinstance(outcome, Failure):
            if not outcome.check(ParticipantError):
                outcome = Failure(ParticipantError(f"training failed: {outcome.getErrorMessage()}"), exc_tb=outcome.getTracebackObject())
            self.stop(outcome)

    @inlineCallbacks
    def _retrying(self, what: str, call: Callable[[], Deferred[T]]) -> Any:
        """`call()` until it succeeds, sleeping with backoff after each transient failure (at least its `retry_after`)."""
        deadline = self.reactor.seconds() + self.retry.retry_timeout
        delay = self.retry.initial_delay
        while True:
            try:
                return (yield call())
            except Transient as problem:
                if self._stopped:
                    raise ParticipantError(f"{what}: stopped") from None
                wait = max(delay, problem.retry_after or 0.0)
                if self.reactor.seconds() + wait > deadline:
                    raise ParticipantError(f"{what}: gave up after {self.retry.retry_timeout:.0f} s: {problem}") from None
                self.summary.retries += 1
                log.debug("{name}: {what} failed ({problem}); retrying in {delay:.1f} s", name=self.name, what=what, problem=problem, delay=wait)
                yield task.deferLater(self.reactor, wait, lambda: None)
                delay = min(delay * self.retry.factor, self.retry.max_delay)


def start_participant(
    participant: Participant,
    coordinator_url: str,
    *,
    reactor: Any = None,
    heartbeat_period: float = 1.0,
    http: HttpClient | None = None,
    retry: RetryPolicy = RetryPolicy(),
    train_in_thread: bool = True,
    keep_downloads: bool = True,
    name: str = "participant",
    ca_file: str | None = None,
    enrolment_token: str | None = None,
    client_certificate: str | None = None,
    client_key: str | None = None,
    clip_norm: float | None = None,
) -> tuple[ParticipantRunner, Deferred[ParticipantSummary]]:
    """Run a participant on a running reactor (the Twisted API).

    `coordinator_url` is `http://host:8081` (polling, the seed's API) or
    `pb://host:5555` (PB: the coordinator pushes selections); `https://` and
    `pbs://` are the same over TLS, every server (the aggregator too)
    verified against the CA bundle `ca_file` (PEM), or the platform's CAs
    without one. Returns the runner (call `.stop()` to stop it) and a
    Deferred that fires with its summary when the coordinator says training
    is finished; a server that fails verification fails it with
    `xaind.sdk.tls.PeerNotTrusted`, at once. `enrolment_token` is shown at
    each rendez-vous to a coordinator that asks for one
    (`participants.authentication: enrolment_tokens`); the PEM file
    `client_certificate` (with its key, or the key in `client_key`) is shown
    to every TLS server that asks for one, the credential of
    `participants.authentication: client_certificates`. A refused
    rendez-vous fails the Deferred with `ParticipantError`.

    `clip_norm` (a number > 0) bounds what each round uploads: the update,
    the trained weights minus the global weights `train_round` was given
    (the weights themselves in the first round, without global weights),
    is scaled to that L2 norm when longer, in the training thread, before
    the upload. It is the participant's own guarantee that its result moves
    the model by at most `clip_norm` (the bound the aggregator's
    differential privacy assumes, enforced before the data leaves); an
    update holding inf or nan cannot be clipped and fails the Deferred with
    `ParticipantError`.

    Raises `ValueError` for an unusable URL, CA bundle, client certificate
    or `clip_norm`.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if http is not None and (ca_file is not None or client_certificate is not None):
        raise ValueError("give ca_file and client_certificate or an http client, not both (the client's are used)")
    if client_key is not None and client_certificate is None:
        raise ValueError("client_key needs client_certificate")
    trust_root = load_trust_root(ca_file) if ca_file is not None else None
    certificate = load_client_certificate(client_certificate, client_key) if client_certificate is not None else None
    client_http = http if http is not None else HttpClient(reactor, trust_root=trust_root, client_certificate=certificate)
    runner = ParticipantRunner(
        participant,
        coordinator_client(reactor, client_http, coordinator_url, enrolment_token),
        client_http,
        reactor,
        heartbeat_period=heartbeat_period,
        retry=retry,
        train_in_thread=train_in_thread,
        keep_downloads=keep_downloads,
        name=name,
        clip_norm=clip_norm,
    )
    done = runner.run()

    def close(outcome: Any) -> Any:
        closing = runner.coordinator.close()
        if http is None:
            closing.addCallback(lambda _: client_http.close())
        closing.addCallback(lambda _: outcome)
        return closing

    done.addBoth(close)
    return runner, done


def run_participant(
    participant: Participant,
    coordinator_url: str,
    heartbeat_period: float = 1.0,
    *,
    retry: RetryPolicy = RetryPolicy(),
    ca_file: str | None = None,
    enrolment_token: str | None = None,
    client_certificate: str | None = None,
    client_key: str | None = None,
    clip_norm: float | None = None,
) -> ParticipantSummary:
    """Run a participant from plain blocking code until training is finished.

    Runs Twisted's reactor in the calling thread (so call it once per
    process, from the main thread); `train_round` runs in a worker thread.
    Ctrl-C stops it. Raises `ParticipantError` if the participant cannot go on.
    The other options are `start_participant`'s: `clip_norm` clips each
    round's update to that L2 norm before it is uploaded.
    """
    from twisted.internet import reactor

    outcome: list[Any] = []

    def begin() -> None:
        try:
            _, done = start_participant(
                participant,
                coordinator_url,
                reactor=reactor,
                heartbeat_period=heartbeat_period,
                retry=retry,
                ca_file=ca_file,
                enrolment_token=enrolment_token,
                client_certificate=client_certificate,
                client_key=client_key,
                clip_norm=clip_norm,
            )
        except ValueError:
            outcome.append(Failure())
            reactor.stop()
            return
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt("stopped before training finished")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
