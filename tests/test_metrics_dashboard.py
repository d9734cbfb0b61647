"""The Grafana dashboard (contrib/grafana/xaind.json): a dashboard Grafana imports, querying metrics that exist.

The metrics are those of the real daemons: both are started with
`metrics.listen` on loopback, trained through two rounds by hand
(xaind.testing.metrics), and scraped; every metric name a panel's query
uses must be in one of the two /metrics pages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from xaind.testing.metrics import Scrape, metrics_federation, short_training

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "xaind.json"

pytestmark = pytest.mark.skipif(not DASHBOARD.parent.parent.is_dir(), reason="contrib/ is not installed with the package")

#: Panel types the dashboard may use (all built into Grafana 9 and later).
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text"}

#: A metric name in a PromQL expression: what the daemons export starts with one of these.
METRIC_NAME = re.compile(r"\b(?:xaind|process|python)_[a-zA-Z0-9_]*")

#: What the text format adds to a family's name in its samples.
SAMPLE_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queried_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in queried_panels(dashboard) for target in panel["targets"]]


def test_the_dashboard_has_what_an_import_requires(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # Grafana gives it one on import
    assert {"time", "templating", "annotations", "panels", "version"} <= dashboard.keys()
    assert dashboard["__inputs"] == [
        {
            "name": "DS_PROMETHEUS",
            "label": "Prometheus",
            "description": "Where both xaind daemons are scraped",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }
    ]


def test_every_panel_has_an_id_a_type_a_place_and_queries(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(each, int) for each in ids) and len(set(ids)) == len(ids)
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert isinstance(panel["title"], str) and panel["title"]
        place = panel["gridPos"]
        assert set(place) == {"h", "w", "x", "y"} and all(isinstance(value, int) and value >= 0 for value in place.values())
        assert place["h"] >= 1 and 1 <= place["w"] and place["x"] + place["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(place["x"], place["x"] + place["w"]) for y in range(place["y"], place["y"] + place["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert isinstance(target["expr"], str) and METRIC_NAME.search(target["expr"]), target


def test_the_dashboard_shows_what_an_operator_looks_for(dashboard: dict[str, Any]) -> None:
    queries = " ".join(expressions(dashboard))
    for wanted in (
        "xaind_coordinator_round",
        "xaind_coordinator_participants",
        "xaind_coordinator_round_duration_seconds_bucket",
        "xaind_aggregator_received_bytes_total",
        "xaind_aggregator_uploads_refused_total",
        "xaind_aggregator_upload_duration_seconds_bucket",
        "xaind_aggregator_aggregation_duration_seconds_bucket",
        "xaind_coordinator_aggregator_attached",
        "xaind_aggregator_coordinator_link_losses_total",
    ):
        assert re.search(rf"\b{wanted}\b", queries), wanted


def family_of(sample: str) -> str:
    for suffix in SAMPLE_SUFFIXES:
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def test_every_metric_a_panel_queries_is_in_the_daemons_metrics(dashboard: dict[str, Any], tmp_path: Path) -> None:
    with metrics_federation(tmp_path, rounds=2, min_clients=2) as fed:
        training = short_training(fed, participants=2, rounds=2)
    scrapes: list[Scrape] = [training.coordinator["round 1"], training.aggregator["round 1"]]
    samples = frozenset().union(*(scrape.sample_names() for scrape in scrapes))
    families = frozenset().union(*(scrape.families for scrape in scrapes))
    queried = {name for expr in expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    assert len(queried) >= 25
    missing = sorted(name for name in queried if name not in samples)
    assert missing == [], f"queried but not exported: {missing}"
    # And each belongs to a family the parser names (a counter's `_total` and a histogram's suffixes map back).
    assert {family_of(name) for name in queried} <= families
