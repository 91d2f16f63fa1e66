"""docker/prometheus: promtool checks, rule unit tests, and the metric names the files use."""

from __future__ import annotations

import re

from helpers import deploy_files as deploy

PROMETHEUS = "docker/prometheus"


def test_promtool_check_config(promtool: str) -> None:
    result = deploy.run_tool([promtool, "check", "config", f"{PROMETHEUS}/prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules(promtool: str) -> None:
    result = deploy.run_tool([promtool, "check", "rules", f"{PROMETHEUS}/rules.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    result = deploy.run_tool([promtool, "test", "rules", f"{PROMETHEUS}/rules_test.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_cover_latency_and_sparsity() -> None:
    """The unit-test file keeps testing the rules operators read most."""
    suite = deploy.load_yaml(deploy.DOCKER_DIR / "prometheus" / "rules_test.yml")
    tested = {case["expr"] for test in suite["tests"] for case in test.get("promql_expr_test", [])}
    assert {
        "loss:hingeloss_request_duration_seconds:p50_rate1m",
        "loss:hingeloss_request_duration_seconds:p99_rate1m",
        "loss:hingeloss_samples_inactive:ratio_rate1m",
    } <= tested


def _compact(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def test_recording_rules_compute_what_the_dashboards_need(rule_exprs: dict[str, str]) -> None:
    buckets = _compact(rule_exprs["loss_le:hingeloss_request_duration_seconds_bucket:rate1m"])
    assert buckets == "sumby(loss,le)(rate(hingeloss_request_duration_seconds_bucket[1m]))"
    for name, quantile in (("p50", "0.5"), ("p99", "0.99")):
        expr = _compact(rule_exprs[f"loss:hingeloss_request_duration_seconds:{name}_rate1m"])
        assert expr == (
            f"histogram_quantile({quantile},"
            "loss_le:hingeloss_request_duration_seconds_bucket:rate1m)"
        )
    sparsity = _compact(rule_exprs["loss:hingeloss_samples_inactive:ratio_rate1m"])
    assert sparsity == (
        'sumby(loss)(rate(hingeloss_samples_total{state="inactive"}[1m]))'
        "/sumby(loss)(rate(hingeloss_samples_total[1m]))"
    )
    assert "rate(hingeloss_requests_total[1m])" in _compact(
        rule_exprs["loss:hingeloss_requests:rate1m"]
    )
    assert 'code!="OK"' in rule_exprs["loss:hingeloss_requests_errors:ratio_rate1m"]
    utilisation = _compact(rule_exprs["device:hingeloss_worker_busy:ratio_rate1m"])
    assert "rate(hingeloss_worker_busy_seconds_total[1m])" in utilisation
    assert "/sumby(device)(hingeloss_workers)" in utilisation


def test_rules_read_only_listed_metrics(
    rule_exprs: dict[str, str], metric_names_file: list[str]
) -> None:
    recorded = set(rule_exprs)
    for name, expr in rule_exprs.items():
        assert deploy.metric_names_in(expr) <= set(metric_names_file), name
        assert deploy.recorded_names_in(expr) <= recorded, f"{name} reads an unknown record"


def test_metric_names_file_lists_known_families(metric_names_file: list[str]) -> None:
    assert len(metric_names_file) == len(set(metric_names_file)), "duplicate lines"
    assert metric_names_file == sorted(metric_names_file)
    for name in metric_names_file:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), f"{name!r} is not a metric name"
        assert deploy.is_known_family(name), f"{name} is no metric family the server exposes"
        assert deploy.base_metric_name(name) == name, f"list the family, not the series {name}"
