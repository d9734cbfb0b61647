"""The aggregator's Prometheus metrics: one named method per event, state read at scrape time.

Uploads, downloads, folds and aggregations call these methods where they
happen (folds on the worker thread: prometheus-client's metrics are
thread-safe); the model round, the results held and the link state are read
from the service by `AggregatorStateCollector` when Prometheus scrapes.
See docs/metrics.rst.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from xaind.metrics import DURATION_BUCKETS, StateCollector, daemon_registry, label_values, name
from xaind.protocol import ErrorCode

if TYPE_CHECKING:
    from xaind.aggregator.service import AggregatorService

#: Every code an upload may be refused with, labelled before the first refusal so each series starts at 0.
UPLOAD_REFUSALS = tuple(ErrorCode)

#: Bytes-sized durations: an upload or a download of a large model over a slow link takes minutes.
TRANSFER_BUCKETS = DURATION_BUCKETS


def now() -> float:
    """A monotonic reading for durations (the reactor's clock may be a test's `Clock`)."""
    return time.perf_counter()


class AggregatorMetrics:
    """The aggregator's counters and histograms, in `registry` (a fresh one of its own by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else daemon_registry(process=False)
        r = self.registry
        self.uploads_accepted = Counter(name("aggregator_uploads_accepted"), "Uploads answered 200: results kept and recorded by the coordinator.", registry=r)
        self.uploads_refused = Counter(name("aggregator_uploads_refused"), "Uploads refused, by the refusal's code.", ["code"], registry=r)
        for code in label_values(UPLOAD_REFUSALS):
            self.uploads_refused.labels(code)
        self.received = Counter(name("aggregator_received_bytes"), "Bytes of upload bodies received.", registry=r)
        self.sent = Counter(name("aggregator_sent_bytes"), "Bytes of the global model sent to downloads.", registry=r)
        self.upload_duration = Histogram(
            name("aggregator_upload_duration_seconds"),
            "Seconds from an accepted upload's headers to its answer (body received, durable, recorded by the coordinator).",
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.download_duration = Histogram(
            name("aggregator_download_duration_seconds"),
            "Seconds from a download's start to its last byte handed to the kernel (complete downloads).",
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.fold_duration = Histogram(
            name("aggregator_fold_duration_seconds"),
            "Seconds the worker took to fold one batch of results into the running sum.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.folded = Counter(name("aggregator_results_folded"), "Results folded into the running sum.", registry=r)
        self.aggregation_duration = Histogram(
            name("aggregator_aggregation_duration_seconds"),
            "Seconds from the coordinator's aggregate request to the new global model installed.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.aggregations_failed = Counter(name("aggregator_aggregations_failed"), "Aggregations that failed (the round runs again).", registry=r)
        self.aggregated_results = Gauge(name("aggregator_round_results"), "Results counted in the last aggregation.", registry=r)
        self.logins = Counter(
            name("aggregator_coordinator_logins"), "Logins to the coordinator over PB (the first and every reconnection).", registry=r
        )
        self.link_losses = Counter(name("aggregator_coordinator_link_losses"), "Losses of the PB link to the coordinator.", registry=r)
        self.login_failures = Counter(
            name("aggregator_coordinator_login_failures"), "Logins to the coordinator that failed (refused, TLS, lost).", registry=r
        )

    # -- events (one line each where they happen) -----------------------------------

    def upload_accepted(self, seconds: float) -> None:
        self.uploads_accepted.inc()
        self.upload_duration.observe(seconds)

    def upload_refused(self, code: ErrorCode) -> None:
        self.uploads_refused.labels(code.value).inc()

    def bytes_received(self, count: int) -> None:
        self.received.inc(count)

    def bytes_sent(self, count: int) -> None:
        self.sent.inc(count)

    def download_done(self, seconds: float) -> None:
        self.download_duration.observe(seconds)

    def folded_batch(self, results: int, seconds: float) -> None:
        self.folded.inc(results)
        self.fold_duration.observe(seconds)

    def aggregated(self, results: int, seconds: float) -> None:
        self.aggregated_results.set(results)
        self.aggregation_duration.observe(seconds)

    def aggregation_failed(self) -> None:
        self.aggregations_failed.inc()

    def logged_in(self) -> None:
        self.logins.inc()

    def link_lost(self) -> None:
        self.link_losses.inc()

    def login_failed(self) -> None:
        self.login_failures.inc()

    # -- state, read at scrape time ------------------------------------------------------

    def watch(self, service: AggregatorService) -> None:
        """Report `service`'s model round, results held and link state at every scrape."""
        self.registry.register(AggregatorStateCollector(service))


class AggregatorStateCollector(StateCollector["AggregatorService"]):
    """The gauges that mirror the aggregator's state, built from it when Prometheus scrapes."""

    def families(self, with_values: bool) -> Iterator[Metric]:
        families = {
            "round": GaugeMetricFamily(name("aggregator_model_round"), "Rounds aggregated into the global model the aggregator serves."),
            "size": GaugeMetricFamily(name("aggregator_model_bytes"), "Size of the global model file (0 before the first aggregation)."),
            "results": GaugeMetricFamily(name("aggregator_results"), "This round's participants at the aggregator, by stage.", labels=["stage"]),
            "aggregating": GaugeMetricFamily(name("aggregator_aggregating"), "1 while an aggregation runs, else 0."),
            "attached": GaugeMetricFamily(name("aggregator_coordinator_attached"), "1 while the PB link to the coordinator is up, else 0."),
        }
        if with_values:
            service = self.service
            rules = service.rules
            families["round"].add_metric([], service.model.round)
            families["size"].add_metric([], service.model.size)
            families["results"].add_metric(["admitted"], len(rules.admitted))
            families["results"].add_metric(["uploading"], len(rules.uploading))
            families["results"].add_metric(["accepted"], len(rules.kept))
            families["aggregating"].add_metric([], 1.0 if rules.aggregating else 0.0)
            families["attached"].add_metric([], 1.0 if service.coordinator.is_attached() else 0.0)
        yield from families.values()
