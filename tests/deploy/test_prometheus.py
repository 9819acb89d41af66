"""Prometheus config and alert rules through promtool; every PromQL query through its parser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy import promql
from tests.deploy.conftest import ROOT, run, tool

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> tuple[int, str]:
    result = run([tool("promtool"), *args], cwd=cwd)
    return result.returncode, result.stdout + result.stderr


def test_check_config() -> None:
    code, out = promtool("check", "config", "prometheus.yml")
    assert code == 0, out
    assert "SUCCESS: prometheus.yml is valid prometheus config file syntax" in out
    assert "SUCCESS: 1 rule files found" in out


def test_check_rules() -> None:
    code, out = promtool("check", "rules", "alerts.yml")
    assert code == 0, out
    assert f"SUCCESS: {len(promql.alert_rules())} rules found" in out


def test_the_four_required_alerts_exist() -> None:
    names = {rule["alert"] for rule in promql.alert_rules()}
    assert {
        "LonghaulTargetDown",
        "LonghaulQueueBacklog",
        "LonghaulHighErrorRatio",
        "LonghaulHighP99Latency",
    } <= names
    for rule in promql.alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rule_unit_tests_pass() -> None:
    code, out = promtool("test", "rules", "alerts.test.yml")
    assert code == 0, out
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if not case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in promql.alert_rules()}
    assert firing == names, "each alert has a case where it fires"
    assert quiet == names, "each alert has a case where it stays quiet"


# Each mutation weakens one alert; its unit test must then fail (the tests are not vacuous).
MUTATIONS = {
    "LonghaulTargetDown": ('up{job="longhaul"} == 0', 'up{job="longhaul"} == 2'),
    "LonghaulQueueBacklog": (") > 64", ") > 1000"),
    "LonghaulHighErrorRatio": ("> 0.05", "> 0.5"),
    "LonghaulHighP99Latency": (") > 2.5", ") > 10"),
    "LonghaulHighP99TimeToFirstToken": (") > 5\n", ") > 20\n"),
}


@pytest.mark.parametrize("alert", sorted(MUTATIONS))
def test_rule_unit_tests_catch_a_weakened_alert(alert: str, tmp_path: Path) -> None:
    old, new = MUTATIONS[alert]
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    assert text.count(old) == 1, f"mutation for {alert} must hit exactly one place"
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(PROMETHEUS_DIR / "alerts.test.yml", tmp_path)
    code, out = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert code == 1, out
    assert f"alertname: {alert}" in out


def test_prometheusrule_matches_alerts_file() -> None:
    """deploy/k8s/prometheusrule.yaml carries exactly the rules that promtool tested."""
    rule = yaml.safe_load((ROOT / "deploy/k8s/prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def as_recording_rules(expressions: list[promql.Expression], path: Path) -> None:
    rules = [{"record": f"longhaul:check:{i}", "expr": e.expr} for i, e in enumerate(expressions)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse", "rules": rules}]}))


def test_dashboard_and_adapter_queries_parse(tmp_path: Path) -> None:
    """Grafana and adapter queries, variables substituted, parsed by promtool as rule exprs."""
    expressions = [
        promql.Expression(e.where, promql.grafana_to_promql(e.expr))
        for e in promql.dashboard_expressions()
    ] + promql.adapter_expressions()
    assert len(expressions) > 30
    as_recording_rules(expressions, tmp_path / "parse.yml")
    code, out = promtool("check", "rules", "parse.yml", cwd=tmp_path)
    assert code == 0, out
    assert f"SUCCESS: {len(expressions)} rules found" in out


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    broken = [promql.Expression("broken", "sum by (model) (rate(longhaul_requests_total[5m])")]
    as_recording_rules(broken, tmp_path / "parse.yml")
    code, out = promtool("check", "rules", "parse.yml", cwd=tmp_path)
    assert code == 1
    assert re.search(r"unclosed left parenthesis|unexpected end of input", out), out
