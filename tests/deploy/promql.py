"""PromQL found in the deployment files, and the metric names it refers to.

Syntax is checked by the real parser (promtool, Prometheus); this module only collects the
expressions and names the metrics each one selects, so tests can compare them with what a
running server exposes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "longhaul.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ADAPTER = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "config.yaml"

# Series Prometheus writes itself for every target; no exporter exposes them.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"([^"]*)"')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_PLAIN_NAME = re.compile(r"^[A-Za-z_:][\w:]*$")


@dataclass(frozen=True)
class Expression:
    where: str  # e.g. "dashboard panel 'Queue depth' A"
    expr: str


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: bare selectors and ``__name__`` matchers.

    Label names, grouping labels, functions, keywords, numbers and durations are not names.
    A ``__name__=~"a|b"`` alternation counts as both names; any other regex is refused, because
    it cannot be checked against a list.
    """
    names: set[str] = set()
    for op, value in _NAME_MATCHER.findall(expr):
        alternatives = value.split("|") if op == "=~" else [value]
        for name in alternatives:
            if not _PLAIN_NAME.match(name):
                raise ValueError(f"__name__ matcher {value!r} is not a list of names: {expr}")
            names.add(name)
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for name in _IDENT.findall(text):
        if name.lower() not in KEYWORDS:
            names.add(name)
    return names


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    """A Grafana query as Prometheus sees it: built-in intervals and variables substituted."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", rate_interval, expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def adapter_to_promql(query: str, namespace: str, pod: str) -> str:
    """A prometheus-adapter metricsQuery for one pod, as the adapter renders it."""
    matchers = f'namespace="{namespace}",pod=~"{pod}"'
    return query.replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", matchers)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels() -> list[dict[str, Any]]:
    return list(_panels(load_dashboard()["panels"]))


def dashboard_expressions() -> list[Expression]:
    """Every panel target and every query variable, with Grafana's own syntax still in."""
    dashboard = load_dashboard()
    found = [
        Expression(f"dashboard panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # label_values(SELECTOR, label): the selector is PromQL, the label is not a metric.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
            if match is None:
                raise ValueError(f"variable {variable['name']}: unsupported query {text!r}")
            found.append(Expression(f"dashboard variable {variable['name']!r}", match[1]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_expressions() -> list[Expression]:
    return [Expression(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(ADAPTER.read_text())["rules"]
    return rules


def adapter_expressions() -> list[Expression]:
    found = []
    for i, rule in enumerate(adapter_rules()):
        found.append(Expression(f"adapter rule {i} seriesQuery", rule["seriesQuery"]))
        query = adapter_to_promql(rule["metricsQuery"], "longhaul", "longhaul-0")
        found.append(Expression(f"adapter rule {i} metricsQuery", query))
    return found
