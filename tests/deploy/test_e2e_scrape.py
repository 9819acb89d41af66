"""End to end: a real Prometheus scrapes a real Longhaul server on loopback.

Prometheus runs deploy/prometheus/prometheus.yml with only the target and intervals rewritten
(1 s scrape and evaluation, a temp storage dir, a free port), so the scrape job, the job label
and the alert rules under test are the shipped ones. The target also gets the namespace/pod
labels that Kubernetes service discovery would add, so the HPA adapter's query runs for real.
Bounded: every wait has a deadline, and Prometheus is always stopped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import promql
from tests.deploy.conftest import ROOT, Server, free_port, stop_process, tool, wait_for

pytestmark = pytest.mark.slow

POD = {"namespace": "longhaul", "pod": "longhaul-test-0"}
ENCODE_OK = 'longhaul_requests_total{job="longhaul", endpoint="/v1/encode", status="200"}'


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="module")
def prometheus(
    longhaul_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{longhaul_server.port}"], "labels": POD}]
    config["rule_files"] = [str(ROOT / "deploy/prometheus" / f) for f in config["rule_files"]]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    cmd = [
        tool("prometheus"),
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}: {log.read_text()}")
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 30, "prometheus ready", log)
        yield Prometheus(url)
    finally:
        stop_process(proc)


def server_count(server: Server, endpoint: str) -> float:
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            labels = sample.labels
            wanted = labels.get("endpoint") == endpoint and labels.get("status") == "200"
            if sample.name == "longhaul_requests_total" and wanted:
                return float(sample.value)
    raise AssertionError(f"no longhaul_requests_total for {endpoint}")


@pytest.fixture(scope="module")
def scraped(longhaul_server: Server, prometheus: Prometheus) -> Prometheus:
    """Traffic sent while Prometheus scrapes; returns once it has seen all of it."""
    wait_for(lambda: prometheus.value('up{job="longhaul"}') == 1.0, 30, "first scrape")
    for _ in range(3):
        longhaul_server.encode()
    longhaul_server.generate()
    expected = server_count(longhaul_server, "/v1/encode")
    assert expected >= 4  # the fixture's first request + these three
    wait_for(lambda: prometheus.value(f"sum({ENCODE_OK})") == expected, 30, f"{expected} encodes")
    # Two more scrapes after that one, so rate() windows hold several samples of the traffic.
    scrapes = 'count_over_time(up{job="longhaul"}[1h])'
    seen = prometheus.value(scrapes)
    assert seen is not None
    wait_for(lambda: (prometheus.value(scrapes) or 0) >= seen + 2, 30, "two more scrapes")
    return prometheus


def test_requests_total_reaches_prometheus(longhaul_server: Server, scraped: Prometheus) -> None:
    (series,) = scraped.query(ENCODE_OK)
    labels = series["metric"]
    assert labels["model"] == "lin" and labels["instance"] == f"127.0.0.1:{longhaul_server.port}"
    assert float(series["value"][1]) == server_count(longhaul_server, "/v1/encode")
    generate = scraped.value(
        'sum(longhaul_requests_total{job="longhaul", endpoint="/v1/generate", status="200"})'
    )
    assert generate is not None and generate >= 2
    targets = scraped.api("targets")["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("longhaul", "up")]


def test_alert_rules_load_and_evaluate_quietly(scraped: Prometheus) -> None:
    def evaluated() -> bool:
        rules = [r for g in scraped.api("rules")["groups"] for r in g["rules"]]
        return all(not r["lastEvaluation"].startswith("0001") for r in rules)

    wait_for(evaluated, 10, "rules evaluated")
    rules = [r for g in scraped.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in promql.alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", f"{rule['name']} fires on a healthy server"


def test_dashboard_queries_return_data(scraped: Prometheus) -> None:
    """Each panel's query, as Grafana would send it, answers; all but the error-only ones
    (no request failed) return series."""
    empty_ok = ('status!~"2.."', 'status=~"5.."', 'status="429"')
    for expression in promql.dashboard_expressions():
        expr = promql.grafana_to_promql(expression.expr, rate_interval="30s")
        result = scraped.query(expr)
        if not any(marker in expression.expr for marker in empty_ok):
            assert result, f"{expression.where}: no data for {expr}"


def test_model_info_reaches_prometheus(scraped: Prometheus) -> None:
    series = scraped.query('longhaul_model_info{job="longhaul"}')
    models = {s["metric"]["model"]: s["metric"] for s in series}
    assert set(models) == {"lin", "ali"}
    assert models["lin"]["provider"] == "CPUExecutionProvider"
    assert models["ali"]["architecture"] == "alibi"


def test_hpa_adapter_query_answers_per_pod(scraped: Prometheus) -> None:
    (rule,) = promql.adapter_rules()
    series = scraped.query(rule["seriesQuery"])
    assert {s["metric"]["__name__"] for s in series} == {
        "longhaul_queue_depth",
        "longhaul_waiting_sequences",
    }
    query = promql.adapter_to_promql(rule["metricsQuery"], POD["namespace"], POD["pod"])
    (result,) = scraped.query(query)
    assert result["metric"] == {"pod": POD["pod"]}
    assert float(result["value"][1]) == 0.0  # nothing waits once the requests are answered
