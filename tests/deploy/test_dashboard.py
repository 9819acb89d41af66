"""The Grafana dashboard and its provisioning: what a person opening it would get.

No Grafana server runs here; the JSON is checked for the things Grafana needs to render it
(unique ids, a grid without overlaps, a datasource on every query) and for the panels the
service's operators asked for. Query syntax and metric names are checked in test_prometheus.py
and test_metric_names.py.
"""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy import promql
from tests.deploy.conftest import ROOT

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def queries(panel: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for t in panel.get("targets", []))


def test_ids_and_uid() -> None:
    dashboard = promql.load_dashboard()
    assert dashboard["uid"] == "longhaul-overview"
    ids = [p["id"] for p in promql.dashboard_panels()]
    assert len(ids) == len(set(ids))


def test_grid_has_no_overlaps() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in promql.dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_uses_the_datasource_variable() -> None:
    dashboard = promql.load_dashboard()
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["name"] == "datasource" and datasource["query"] == "prometheus"
    provisioned = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert datasource["current"]["value"] == source["uid"]
    assert source["url"] == "http://prometheus:9090"  # the compose service name and port
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for panel in promql.dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ref, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ref and target["expr"].strip(), panel["title"]


def test_required_panels() -> None:
    """Each topic of issue 6 has a panel that queries the metric behind it."""
    panels = {p["title"]: queries(p) for p in promql.dashboard_panels() if p["type"] != "row"}
    wanted = {
        "Request rate by endpoint and status": ["longhaul_requests_total", "status"],
        "Errors by status": ["longhaul_requests_total", 'status!~"2.."'],
        "Error ratio": ['status=~"5.."'],
        "Request latency (p50 / p95 / p99)": ["longhaul_request_duration_seconds_bucket"],
        "Queue depth": ["longhaul_queue_depth", "longhaul_waiting_sequences"],
        "Queue time (p50 / p95 / p99)": ["longhaul_queue_duration_seconds_bucket"],
        "Batch size": ["longhaul_batch_size_sum", "longhaul_batch_size_bucket"],
        "Padding ratio": ["longhaul_batch_padding_ratio_sum"],
        "Time to first token (p50 / p95 / p99)": ["longhaul_time_to_first_token_seconds_bucket"],
        "Inter-token latency (p50 / p95 / p99)": ["longhaul_inter_token_latency_seconds_bucket"],
        "Tokens per second (in / out)": [
            "longhaul_input_tokens_total",
            "longhaul_generated_tokens_total",
        ],
        "Inference time by length bucket (p95)": ["length_bucket"],
        "Loaded models": ["longhaul_model_info", "provider", "precision"],
    }
    for title, needles in wanted.items():
        assert title in panels, f"missing panel {title!r}"
        for needle in needles:
            assert needle in panels[title], f"{title!r} does not query {needle}"
    for title in [t for t in panels if "p50 / p95 / p99" in t]:
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}," in panels[title], title


def test_traffic_panels_leave_out_probes_and_scrapes() -> None:
    for panel in promql.dashboard_panels():
        for target in panel.get("targets", []):
            if "longhaul_requests_total" in target["expr"]:
                assert 'endpoint=~"/v1/.*"' in target["expr"], panel["title"]


def test_provider_points_at_the_mounted_dashboards() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards/longhaul.yml").read_text())
    (entry,) = provider["providers"]
    assert entry["options"]["path"] == "/etc/grafana/dashboards"
    assert entry["type"] == "file"
