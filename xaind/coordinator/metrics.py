"""The coordinator's Prometheus metrics: one named method per event, state read at scrape time.

The service calls these methods where the event happens, one short line
each; the round, the phase, the participants by state and the link state
are read from the service by `CoordinatorStateCollector` when Prometheus
scrapes, so they are always what `/status` says. See docs/metrics.rst.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from xaind.coordinator.rounds import ParticipantState, Phase
from xaind.metrics import DURATION_BUCKETS, StateCollector, daemon_registry, label_values, name
from xaind.protocol import ErrorCode

if TYPE_CHECKING:
    from xaind.coordinator.service import CoordinatorService

#: Why a round ran again: its aggregation failed, or the aggregator lost results the coordinator counted.
REPEAT_REASONS = ("aggregation_failed", "results_missing", "shard_lost")

#: The refusals of a rendez-vous (their `ErrorCode`), labelled before the first one happens.
RENDEZ_VOUS_REFUSALS = (ErrorCode.RENDEZ_VOUS_RATE_LIMITED, ErrorCode.NOT_AUTHENTICATED, ErrorCode.TOO_MANY_PARTICIPANTS)

#: Selection to start training: from a participant's near-immediate request to one that waited out a long heartbeat.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class CoordinatorMetrics:
    """The coordinator's counters and histograms, in `registry` (a fresh one of its own by default).

    A service built without metrics gets one with a private registry that
    nothing scrapes: the service's lines never need to ask whether metrics are on.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else daemon_registry(process=False)
        r = self.registry
        self.rendez_vous = Counter(name("coordinator_rendez_vous"), "Rendez-vous accepted (new and known participants).", registry=r)
        self.rendez_vous_refused = Counter(
            name("coordinator_rendez_vous_refused"), "Rendez-vous refused, by the refusal's code.", ["code"], registry=r
        )
        for code in label_values(RENDEZ_VOUS_REFUSALS):
            self.rendez_vous_refused.labels(code)
        self.heartbeats = Counter(name("coordinator_heartbeats"), "Heartbeats answered (HTTP and PB).", registry=r)
        self.held_heartbeats = Counter(
            name("coordinator_held_heartbeats"), "HTTP heartbeats held open until there is news (api.heartbeat_hold).", registry=r
        )
        self.selections = Counter(name("coordinator_selections"), "Participants selected for a round (one per participant and selection).", registry=r)
        self.heartbeat_timeouts = Counter(
            name("coordinator_heartbeat_timeouts"), "Participants forgotten because their heartbeats stopped.", registry=r
        )
        self.training_timeouts = Counter(
            name("coordinator_training_timeouts"), "Selected participants that delivered nothing within training_timeout.", registry=r
        )
        self.start_latency = Histogram(
            name("coordinator_selection_to_start_training_seconds"),
            "Seconds from a participant's selection to its start-training request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rounds_aggregated = Counter(name("coordinator_rounds_aggregated"), "Rounds whose aggregation succeeded.", registry=r)
        self.rounds_repeated = Counter(name("coordinator_rounds_repeated"), "Rounds that ran again, by reason.", ["reason"], registry=r)
        for reason in REPEAT_REASONS:
            self.rounds_repeated.labels(reason)
        self.round_duration = Histogram(
            name("coordinator_round_duration_seconds"),
            "Seconds from a round's first selection to the end of its aggregation (or its failure).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.results_counted = Counter(name("coordinator_results_counted"), "Results sent to aggregation, summed over rounds.", registry=r)
        self.last_round_results = Gauge(name("coordinator_round_results"), "Results counted in the last round sent to aggregation.", registry=r)
        self.aggregator_attachments = Counter(
            name("coordinator_aggregator_attachments"), "Logins of the aggregator over PB (the first and every reconnection).", registry=r
        )
        self.aggregator_detachments = Counter(name("coordinator_aggregator_detachments"), "Losses of the aggregator's PB link.", registry=r)

    # -- events (one line each in the service) ---------------------------------------

    def rendez_vous_accepted(self) -> None:
        self.rendez_vous.inc()

    def rendez_vous_refusal(self, code: ErrorCode) -> None:
        self.rendez_vous_refused.labels(code.value).inc()

    def heartbeat(self) -> None:
        self.heartbeats.inc()

    def heartbeat_held(self) -> None:
        self.held_heartbeats.inc()

    def selected(self, count: int) -> None:
        self.selections.inc(count)

    def heartbeat_timed_out(self) -> None:
        self.heartbeat_timeouts.inc()

    def training_timed_out(self) -> None:
        self.training_timeouts.inc()

    def started_training(self, seconds_since_selection: float) -> None:
        self.start_latency.observe(max(0.0, seconds_since_selection))

    def aggregation_requested(self, counted: int) -> None:
        self.results_counted.inc(counted)
        self.last_round_results.set(counted)

    def round_ended(self, duration: float, aggregated: bool) -> None:
        self.round_duration.observe(max(0.0, duration))
        if aggregated:
            self.rounds_aggregated.inc()

    def round_repeated(self, reason: str) -> None:
        self.rounds_repeated.labels(reason).inc()

    def aggregator_attached(self) -> None:
        self.aggregator_attachments.inc()

    def aggregator_detached(self) -> None:
        self.aggregator_detachments.inc()

    # -- state, read at scrape time ------------------------------------------------------

    def watch(self, service: CoordinatorService) -> None:
        """Report `service`'s round, phase, participants and link state at every scrape."""
        self.registry.register(CoordinatorStateCollector(service))


class CoordinatorStateCollector(StateCollector["CoordinatorService"]):
    """The gauges that mirror the service's state, built from it when Prometheus scrapes."""

    def families(self, with_values: bool) -> Iterator[Metric]:
        service = self.service
        machine = service.machine
        families = {
            "round": GaugeMetricFamily(name("coordinator_round"), "The round being trained (0-based: rounds aggregated so far)."),
            "rounds": GaugeMetricFamily(name("coordinator_rounds"), "The rounds configured (federated_learning.rounds)."),
            "phase": GaugeMetricFamily(name("coordinator_phase"), "1 for the phase the coordinator is in, 0 for the others.", labels=["phase"]),
            "participants": GaugeMetricFamily(name("coordinator_participants"), "Known participants, by state.", labels=["state"]),
            "minimum": GaugeMetricFamily(name("coordinator_minimum_participants"), "Participants a round needs (federated_learning.min_clients)."),
            "watched": GaugeMetricFamily(
                name("coordinator_watched_participants"), "Participants the coordinator pushes news to (PB participants, held HTTP heartbeats)."
            ),
            "attached": GaugeMetricFamily(name("coordinator_aggregator_attached"), "1 while the aggregator's PB link is up, else 0."),
            "shards": GaugeMetricFamily(
                name("coordinator_aggregator_shards"), "Aggregator shards attached (aggregator.shards above 1; 0 with a lone aggregator)."
            ),
            "since": GaugeMetricFamily(
                name("coordinator_last_aggregation_timestamp_seconds"), "When the last round was aggregated (Unix time; absent before the first)."
            ),
        }
        if with_values:
            counters = machine.counters()
            families["round"].add_metric([], machine.round)
            families["rounds"].add_metric([], service.settings.rounds)
            for phase in Phase:
                families["phase"].add_metric([phase.value], 1.0 if machine.phase is phase else 0.0)
            for state in ParticipantState:
                families["participants"].add_metric([state.value], getattr(counters, state.value))
            families["minimum"].add_metric([], service.settings.round_rules.minimum_participants)
            families["watched"].add_metric([], service.watched_count())
            families["attached"].add_metric([], 1.0 if service.aggregator.is_attached() else 0.0)
            families["shards"].add_metric([], len(service.aggregator.attached_shards()))
            if service.history.last_aggregation_at is not None:
                families["since"].add_metric([], service.history.last_aggregation_at)
        yield from families.values()
