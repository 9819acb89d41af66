"""Every metric the dashboard, the alerts and the HPA adapter query exists on a real server.

The names come from the live ``/metrics`` of ``python -m service`` after one encode and one
generate request (conftest ``longhaul_server``), so a renamed or never-exported metric fails here
instead of leaving an empty panel or an alert that can never fire.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import promql
from tests.deploy.conftest import Server


def exposed_names(text: str) -> set[str]:
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


@pytest.fixture(scope="module")
def exposed(longhaul_server: Server) -> set[str]:
    names = exposed_names(longhaul_server.metrics_after_first_requests)
    assert "longhaul_requests_total" in names
    return names


ALL = promql.dashboard_expressions() + promql.alert_expressions() + promql.adapter_expressions()


@pytest.mark.parametrize("expression", ALL, ids=[e.where for e in ALL])
def test_expression_uses_only_exposed_metrics(
    expression: promql.Expression, exposed: set[str]
) -> None:
    names = promql.metric_names(expression.expr)
    assert names, f"no metric found in {expression.expr!r}"
    missing = names - exposed - promql.PROMETHEUS_SYNTHETIC
    assert not missing, f"{expression.where} queries metrics the server does not expose: {missing}"


def test_the_metrics_of_the_design_are_all_used(exposed: set[str]) -> None:
    """The other direction: each contract metric that is exposed after these two requests is
    queried somewhere (requests_rejected only appears after a rejection)."""
    used = set().union(*(promql.metric_names(e.expr) for e in ALL))
    families = {
        "longhaul_requests_total",
        "longhaul_request_duration_seconds_bucket",
        "longhaul_queue_duration_seconds_bucket",
        "longhaul_queue_depth",
        "longhaul_batch_size_bucket",
        "longhaul_batch_tokens_sum",
        "longhaul_batch_padding_ratio_sum",
        "longhaul_inference_duration_seconds_bucket",
        "longhaul_input_tokens_total",
        "longhaul_generated_tokens_total",
        "longhaul_time_to_first_token_seconds_bucket",
        "longhaul_inter_token_latency_seconds_bucket",
        "longhaul_model_info",
        "longhaul_waiting_sequences",
        "longhaul_running_sequences",
        "longhaul_kv_cache_bytes",
    }
    assert families <= exposed
    assert families <= used, families - used


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="longhaul"} == 0', {"up"}),
        (
            'sum by (job, endpoint, le) (rate(a_bucket{endpoint=~"/v1/(x|y)"}[5m])) / '
            "on (job) group_left(model) sum without (le) (b_total offset 5m) > bool 1e3",
            {"a_bucket", "b_total"},
        ),
        (
            'histogram_quantile(0.99, sum by (le) (rate(c_bucket{s="a{b}"}[$__rate_interval])))',
            {"c_bucket"},
        ),
        ('{__name__=~"d|e", pod!=""}', {"d", "e"}),
        ("max(f) or max(g) unless h", {"f", "g", "h"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert promql.metric_names(expr) == names


def test_a_misspelt_metric_is_caught(exposed: set[str]) -> None:
    names = promql.metric_names("sum(rate(longhaul_request_total[5m]))")
    assert names - exposed == {"longhaul_request_total"}


def test_a_name_regex_is_refused() -> None:
    with pytest.raises(ValueError, match="not a list of names"):
        promql.metric_names('{__name__=~"longhaul_.*"}')
