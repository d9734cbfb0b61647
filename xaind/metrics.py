"""Prometheus metrics: a registry per daemon, served at /metrics on a listener of its own.

Each daemon builds its own `CollectorRegistry` (not prometheus-client's
global one), so that services built side by side in one process (the tests)
never share or collide on a metric. Counters and histograms are changed
where their event happens, through the named methods of the daemon's
metrics object (xaind/coordinator/metrics.py, xaind/aggregator/metrics.py);
gauges that mirror the daemon's state are read from it at scrape time by a
collector, so they cannot drift from what `/status` says.

Labels are bounded: refusal codes (`ErrorCode`), states, phases, reasons.
No participant id or token is ever a label or a value.

The page is rendered on the reactor thread (`MetricsPage`), not with
prometheus-client's `prometheus_client.twisted.MetricsResource`: that one is
a WSGI resource, run on the reactor's thread pool, where the collectors
would read the services' state while the reactor thread changes it (a dict
that changes size under an iteration), and importing it installs the default
reactor before a test can choose one. A few hundred series render in well
under a millisecond.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from twisted.web.resource import Resource
from twisted.web.server import Request

from xaind.http_limits import HTTPLimits
from xaind.web import QuietSite

#: Every metric of xaind starts with this (process_* and python_* are prometheus-client's standard names).
PREFIX = "xaind"

#: The names under which xaind.listening reports the metrics listeners (and the ready file lists their ports).
COORDINATOR_METRICS_LISTENER = "coordinator metrics"
AGGREGATOR_METRICS_LISTENER = "aggregator metrics"

#: Buckets for durations from a millisecond to ten minutes (uploads, folds, aggregations, rounds).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def name(suffix: str) -> str:
    """`xaind_<suffix>`: the full name of one of xaind's metrics."""
    return f"{PREFIX}_{suffix}"


def daemon_registry(process: bool = True) -> CollectorRegistry:
    """A registry of its own, with the process, platform and garbage-collector collectors unless `process` is false.

    Tests that build many services leave `process` false: the process is
    one, and its collectors read /proc at every scrape.
    """
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """The registry in Prometheus's text format (or OpenMetrics, if the scraper's Accept header asks for it)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept is not None else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        page: bytes = encoder(self.registry)
        return page

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


def metrics_site(registry: CollectorRegistry, reactor: Any = None, limits: HTTPLimits = HTTPLimits()) -> QuietSite:
    """`GET /metrics`: the registry, rendered on the reactor thread (anything else: 404)."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    site = QuietSite(root, reactor=reactor, limits=limits)
    site.noisy = False
    return site


def label_values(values: Iterable[Any]) -> list[str]:
    """The string values of an enum's members (or of strings), for labels created before their first event."""
    return [getattr(value, "value", value) for value in values]


ServiceT = TypeVar("ServiceT")


class StateCollector(Generic[ServiceT]):
    """Gauges that mirror a service's state, built from it at every scrape: nothing to keep in step.

    Subclasses say which families there are and, with `with_values`, fill them.
    """

    def __init__(self, service: ServiceT) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return list(self.families(with_values=False))

    def collect(self) -> Iterator[Metric]:
        return self.families(with_values=True)

    def families(self, with_values: bool) -> Iterator[Metric]:
        raise NotImplementedError
