"""docker/grafana: the RED dashboard, its queries and its provisioning."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import deploy_files as deploy

DASHBOARD = "grafana/dashboards/hingeloss.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (deploy.DOCKER_DIR / DASHBOARD).read_text(encoding="utf-8")
    )
    return document


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    path = deploy.DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    (datasource,) = deploy.load_yaml(path)["datasources"]
    assert datasource["type"] == "prometheus"
    uid: str = datasource["uid"]
    return uid


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text: panel targets and template variable queries."""
    queries = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            refs = [t["refId"] for t in panel["targets"]]
            assert refs, panel["title"]
            assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_uses_the_provisioned_datasource_by_uid(
    dashboard: dict[str, Any], datasource_uid: str
) -> None:
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource_uid


def test_dashboard_metrics_are_listed(
    dashboard: dict[str, Any], metric_names_file: list[str]
) -> None:
    used = set().union(*(deploy.metric_names_in(q) for q in _queries(dashboard)))
    assert used <= set(metric_names_file), sorted(used - set(metric_names_file))


def test_metric_names_file_is_exactly_what_dashboard_and_rules_read(
    dashboard: dict[str, Any],
    rule_exprs: dict[str, str],
    metric_names_file: list[str],
) -> None:
    used = set().union(
        *(deploy.metric_names_in(q) for q in _queries(dashboard)),
        *(deploy.metric_names_in(e) for e in rule_exprs.values()),
    )
    assert set(metric_names_file) == used


def test_dashboard_covers_red_batching_sparsity_and_devices(dashboard: dict[str, Any]) -> None:
    used = set().union(*(deploy.metric_names_in(q) for q in _queries(dashboard)))
    assert {
        "hingeloss_requests_total",
        "hingeloss_request_duration_seconds",
        "hingeloss_requests_rejected_total",
        "hingeloss_queue_wait_seconds",
        "hingeloss_batch_rows",
        "hingeloss_batch_requests",
        "hingeloss_samples_total",
        "hingeloss_margin",
        "hingeloss_worker_busy_seconds_total",
        "hingeloss_workers",
        "hingeloss_gpu_memory_allocated_bytes",
        "hingeloss_gpu_memory_reserved_bytes",
    } <= used
    heatmaps = [p for p in _panels(dashboard) if p["type"] == "heatmap"]
    margin = [
        p for p in heatmaps if any("hingeloss_margin_bucket" in t["expr"] for t in p["targets"])
    ]
    assert margin, "no heatmap of hingeloss_margin_bucket"
    assert all(t["format"] == "heatmap" for t in margin[0]["targets"])
    assert margin[0]["options"]["calculate"] is False, "the buckets are already a histogram"


def test_dashboard_queries_parse(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables substituted, is valid PromQL for promtool."""
    rules = []
    for index, query in enumerate(_queries(dashboard)):
        if query.startswith("label_values("):
            continue  # Grafana templating syntax, not PromQL
        expr = query.replace("$__rate_interval", "1m").replace("$", "")
        rules.append({"record": f"dashboard:query_{index}:check", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = deploy.run_tool([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_provider_is_a_file_provider() -> None:
    path = deploy.DOCKER_DIR / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
    (provider,) = deploy.load_yaml(path)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
