"""Prometheus metrics: the metric objects on their own, and /metrics of both real daemons during a training.

The daemon test starts both daemons with `metrics.listen` on an OS-chosen
loopback port (its port read from the ready file), drives two HTTP
participants by hand through two rounds with two refused uploads on the way
(xaind.testing.metrics), and scrapes both /metrics pages at each step.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from xaind.aggregator.metrics import AggregatorMetrics
from xaind.coordinator.metrics import CoordinatorMetrics
from xaind.coordinator.rounds import RoundStateMachine
from xaind.coordinator.service import CoordinatorService, StartTrainingAnswer
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings
from xaind.metrics import daemon_registry
from xaind.protocol import ErrorCode
from xaind.testing.fakes import FakeAggregator
from xaind.testing.metrics import Training, metrics_federation, short_training

HEARTBEAT_TIMEOUT = 10.0
TRAINING_TIMEOUT = 100.0


# -- the metric objects, each with a fresh registry ---------------------------------------


def test_coordinator_counters_and_histograms_count_their_events() -> None:
    metrics = CoordinatorMetrics(CollectorRegistry())
    value = metrics.registry.get_sample_value
    metrics.rendez_vous_accepted()
    metrics.rendez_vous_refusal(ErrorCode.TOO_MANY_PARTICIPANTS)
    metrics.heartbeat()
    metrics.heartbeat()
    metrics.heartbeat_held()
    metrics.selected(3)
    metrics.started_training(0.2)
    metrics.started_training(4.0)
    metrics.aggregation_requested(3)
    metrics.round_ended(12.5, aggregated=True)
    metrics.round_repeated("results_missing")
    assert value("xaind_coordinator_rendez_vous_total") == 1
    assert value("xaind_coordinator_rendez_vous_refused_total", {"code": "too_many_participants"}) == 1
    assert value("xaind_coordinator_rendez_vous_refused_total", {"code": "not_authenticated"}) == 0
    assert value("xaind_coordinator_heartbeats_total") == 2
    assert value("xaind_coordinator_held_heartbeats_total") == 1
    assert value("xaind_coordinator_selections_total") == 3
    assert value("xaind_coordinator_selection_to_start_training_seconds_count") == 2
    assert value("xaind_coordinator_selection_to_start_training_seconds_sum") == pytest.approx(4.2)
    assert value("xaind_coordinator_selection_to_start_training_seconds_bucket", {"le": "0.25"}) == 1
    assert value("xaind_coordinator_results_counted_total") == 3
    assert value("xaind_coordinator_round_results") == 3
    assert value("xaind_coordinator_rounds_aggregated_total") == 1
    assert value("xaind_coordinator_round_duration_seconds_sum") == 12.5
    assert value("xaind_coordinator_rounds_repeated_total", {"reason": "results_missing"}) == 1
    assert value("xaind_coordinator_rounds_repeated_total", {"reason": "aggregation_failed"}) == 0


def test_aggregator_counters_and_histograms_count_their_events() -> None:
    metrics = AggregatorMetrics(CollectorRegistry())
    value = metrics.registry.get_sample_value
    metrics.upload_accepted(0.5)
    metrics.upload_refused(ErrorCode.UNKNOWN_TOKEN)
    metrics.upload_refused(ErrorCode.UNKNOWN_TOKEN)
    metrics.bytes_received(1000)
    metrics.bytes_sent(300)
    metrics.download_done(0.1)
    metrics.folded_batch(2, 0.01)
    metrics.aggregated(2, 0.3)
    metrics.logged_in()
    metrics.link_lost()
    metrics.logged_in()
    assert value("xaind_aggregator_uploads_accepted_total") == 1
    assert value("xaind_aggregator_upload_duration_seconds_count") == 1
    assert value("xaind_aggregator_uploads_refused_total", {"code": "unknown_token"}) == 2
    # Every code is there from the start, at 0: a rate() over it needs no first refusal.
    assert all(value("xaind_aggregator_uploads_refused_total", {"code": code.value}) is not None for code in ErrorCode)
    assert value("xaind_aggregator_received_bytes_total") == 1000
    assert value("xaind_aggregator_sent_bytes_total") == 300
    assert value("xaind_aggregator_download_duration_seconds_count") == 1
    assert value("xaind_aggregator_results_folded_total") == 2
    assert value("xaind_aggregator_fold_duration_seconds_count") == 1
    assert value("xaind_aggregator_round_results") == 2
    assert value("xaind_aggregator_aggregation_duration_seconds_sum") == 0.3
    assert value("xaind_aggregator_coordinator_logins_total") == 2
    assert value("xaind_aggregator_coordinator_link_losses_total") == 1


def test_two_metric_objects_do_not_share_a_registry() -> None:
    first, second = CoordinatorMetrics(), CoordinatorMetrics()
    first.heartbeat()
    assert first.registry.get_sample_value("xaind_coordinator_heartbeats_total") == 1
    assert second.registry.get_sample_value("xaind_coordinator_heartbeats_total") == 0


def test_a_daemon_registry_has_the_process_metrics() -> None:
    registry = daemon_registry()
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None


def result_of(deferred: Deferred) -> object:
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_the_coordinator_state_is_read_at_scrape_time_and_events_counted() -> None:
    clock, aggregator = Clock(), FakeAggregator()
    names = itertools.count()
    metrics = CoordinatorMetrics(CollectorRegistry())
    service = CoordinatorService(
        FederatedLearningSettings(
            rounds=2, participants_ratio=1.0, min_clients=2, heartbeat_timeout=HEARTBEAT_TIMEOUT, training_timeout=TRAINING_TIMEOUT
        ),
        AggregatorSettings(url="http://aggregator.test:8082", admit_timeout=5.0, aggregation_timeout=50.0),
        aggregator,
        clock,
        participant_ids=lambda: f"p{next(names)}",
        tokens=lambda: f"t{next(names)}",
        metrics=metrics,
    )
    service.machine = RoundStateMachine(service.settings.round_rules, rng=random.Random(7))
    service.startService()
    value = metrics.registry.get_sample_value
    try:
        assert value("xaind_coordinator_round") == 0
        assert value("xaind_coordinator_rounds") == 2
        assert value("xaind_coordinator_phase", {"phase": "training"}) == 1
        assert value("xaind_coordinator_aggregator_attached") == 1
        first = service.rendez_vous().participant_id
        assert value("xaind_coordinator_participants", {"state": "waiting"}) == 1
        second = service.rendez_vous().participant_id
        assert value("xaind_coordinator_participants", {"state": "selected"}) == 2
        assert value("xaind_coordinator_selections_total") == 2
        clock.advance(1.5)
        tokens = {}
        for participant in (first, second):
            service.heartbeat(participant)
            answer = result_of(service.start_training(participant))
            assert isinstance(answer, StartTrainingAnswer) and answer.ok
            tokens[participant] = answer.token
        assert value("xaind_coordinator_heartbeats_total") == 2
        assert value("xaind_coordinator_selection_to_start_training_seconds_sum") == 3.0
        for participant in (first, second):
            assert service.end_training(participant, tokens[participant], True)
        assert value("xaind_coordinator_phase", {"phase": "aggregating"}) == 1
        assert value("xaind_coordinator_round_results") == 2
        clock.advance(2.0)
        aggregator.aggregations[-1].deferred.callback(None)
        clock.advance(1.0)  # the round counter is written, then the round moves on
        assert value("xaind_coordinator_round") == 1
        assert value("xaind_coordinator_rounds_aggregated_total") == 1
        assert value("xaind_coordinator_round_duration_seconds_sum") >= 3.5
        assert value("xaind_coordinator_last_aggregation_timestamp_seconds") is not None
        aggregator.attached = False
        assert value("xaind_coordinator_aggregator_attached") == 0
        assert value("xaind_coordinator_participants", {"state": "selected"}) == 2  # for round 1
        for _ in range(int(TRAINING_TIMEOUT / 5)):  # heartbeating, but delivering nothing
            clock.advance(5.0)
            for participant in (first, second):
                service.heartbeat(participant)
        assert value("xaind_coordinator_training_timeouts_total") == 2
        clock.advance(HEARTBEAT_TIMEOUT)
        assert value("xaind_coordinator_heartbeat_timeouts_total") == 2
        assert value("xaind_coordinator_participants", {"state": "waiting"}) == 0
    finally:
        service.stopService()


# -- both daemons, during a training --------------------------------------------------------


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Training:
    with metrics_federation(tmp_path_factory.mktemp("metrics"), rounds=2, min_clients=2) as fed:
        return short_training(fed, participants=2, rounds=2)


def test_the_round_and_participant_gauges_change_during_the_training(training: Training) -> None:
    rounds = [training.coordinator[step].value("xaind_coordinator_round") for step in ("start", "selected", "round 0", "round 1")]
    assert rounds == [0, 0, 1, 2]
    selected = [training.coordinator[step].value("xaind_coordinator_participants", state="selected") for step in ("start", "selected")]
    assert selected == [0, 2]
    end = training.coordinator["round 1"]
    assert end.value("xaind_coordinator_rounds") == 2
    assert end.value("xaind_coordinator_phase", phase="complete") == 1
    assert end.value("xaind_coordinator_rendez_vous_total") == 2
    assert end.value("xaind_coordinator_selections_total") == 4
    assert end.value("xaind_coordinator_rounds_aggregated_total") == 2
    assert end.value("xaind_coordinator_round_duration_seconds_count") == 2
    assert end.value("xaind_coordinator_selection_to_start_training_seconds_count") == 4
    assert end.value("xaind_coordinator_aggregator_attached") == 1
    assert end.value("xaind_coordinator_aggregator_attachments_total") == 1
    assert training.aggregator["round 1"].value("xaind_aggregator_model_round") == 2
    assert training.aggregator["round 1"].value("xaind_aggregator_coordinator_logins_total") == 1


def test_the_upload_and_aggregation_histograms_fill(training: Training) -> None:
    def counts(sample: str) -> list[float]:
        return [training.aggregator[step].value(sample) for step in ("start", "round 0", "round 1")]

    assert counts("xaind_aggregator_upload_duration_seconds_count") == [0, 2, 4]
    assert counts("xaind_aggregator_aggregation_duration_seconds_count") == [0, 1, 2]
    assert counts("xaind_aggregator_fold_duration_seconds_count")[-1] >= 2
    assert counts("xaind_aggregator_results_folded_total") == [0, 2, 4]
    # Round 0's downloads are empty (no model yet): round 1's two send the model.
    end = training.aggregator["round 1"]
    assert end.value("xaind_aggregator_download_duration_seconds_count") == 2
    assert end.value("xaind_aggregator_sent_bytes_total") == 2 * end.value("xaind_aggregator_model_bytes") > 0
    assert end.value("xaind_aggregator_received_bytes_total") > training.aggregator["refused"].value("xaind_aggregator_received_bytes_total")
    assert end.value("xaind_aggregator_uploads_accepted_total") == 4


def test_a_refused_upload_counts_under_its_code(training: Training) -> None:
    before, after = training.aggregator["selected"], training.aggregator["refused"]
    for code in ("unknown_token", "malformed_upload"):
        sample = ("xaind_aggregator_uploads_refused_total", {"code": code})
        assert (before.value(sample[0], **sample[1]), after.value(sample[0], **sample[1])) == (0, 1)
    assert after.value("xaind_aggregator_uploads_refused_total", code="upload_too_large") == 0
    assert after.value("xaind_aggregator_uploads_accepted_total") == 0


def test_no_participant_id_or_token_appears_in_metrics(training: Training) -> None:
    assert len(training.secrets) == 2 * 1 + 2 * 2 + 1  # ids, a token per round each, the wrong token
    pages = [scrape.text for scrape in (*training.coordinator.values(), *training.aggregator.values())]
    for secret in training.secrets:
        for page in pages:
            assert secret not in page
    # Nor anything shaped like one: every label value is a known word or number.
    for page in pages:
        for value in re.findall(r'="([^"]*)"', page):
            assert re.fullmatch(r"[a-z_]+|[0-9.e+]+|\+Inf|[0-9a-zA-Z. ]+", value), value


# -- the listener ------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", [None, "tcp:0:interface=127.0.0.1"])
def test_each_daemon_has_a_metrics_listener_only_when_metrics_listen_is_set(tmp_path: Path, listen: str | None) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from xaind.aggregator import tap as aggregator_tap
    from xaind.aggregator.settings import AggregatorDaemonSettings
    from xaind.coordinator import tap as coordinator_tap
    from xaind.coordinator.settings import CoordinatorSettings
    from xaind.listening import ListeningService

    document = {"development": True, **({} if listen is None else {"metrics": {"listen": listen}})}
    listeners = {}
    for tap, settings_class, daemon in (
        (coordinator_tap, CoordinatorSettings, "coordinator"),
        (aggregator_tap, AggregatorDaemonSettings, "aggregator"),
    ):
        options = tap.Options()
        options.settings = settings_class.from_mapping(
            {**document, "state_dir": str(tmp_path / daemon)}, source=str(tmp_path / f"{daemon}.yaml")
        )
        top = tap.makeService(options, reactor=MemoryReactorClock())
        listeners[daemon] = {service.what: service.description for service in top if isinstance(service, ListeningService)}
    if listen is None:
        assert "coordinator metrics" not in listeners["coordinator"] and "aggregator metrics" not in listeners["aggregator"]
    else:
        assert listeners["coordinator"]["coordinator metrics"] == listen
        assert listeners["aggregator"]["aggregator metrics"] == listen


def test_the_metrics_site_serves_the_registry_at_metrics_and_nothing_else() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from xaind.metrics import metrics_site
    from xaind.testing.memory_http import MemoryHTTP

    metrics = CoordinatorMetrics(CollectorRegistry())
    metrics.heartbeat()
    site = metrics_site(metrics.registry)
    site.reactor = MemoryReactorClock()
    http = MemoryHTTP(site)
    try:
        answer = http.request(b"GET", b"/metrics").response()
        assert answer.code == 200
        assert answer.header(b"content-type")[0].startswith(b"text/plain")
        assert b"\nxaind_coordinator_heartbeats_total 1.0\n" in answer.body
        open_metrics = http.request(b"GET", b"/metrics", {b"accept": b"application/openmetrics-text; version=1.0.0"}).response()
        assert open_metrics.header(b"content-type")[0].startswith(b"application/openmetrics-text")
        assert open_metrics.body.endswith(b"# EOF\n")
        assert http.request(b"GET", b"/").response().code == 404
        assert http.request(b"GET", b"/status").response().code == 404
    finally:
        http.close()
