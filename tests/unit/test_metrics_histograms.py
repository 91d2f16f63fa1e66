"""Metric collectors without a server: bulk histograms equal client_python's; a fresh registry."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from hingeloss_server.prometheus import (
    FRACTION_BUCKETS,
    LATENCY_BUCKETS,
    MARGIN_BUCKETS,
    BulkHistogram,
    PrometheusMetrics,
)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[object, ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize(
    "buckets", [MARGIN_BUCKETS, FRACTION_BUCKETS, LATENCY_BUCKETS], ids=["signed", "0-1", "latency"]
)
def test_bulk_histogram_matches_client_histogram(buckets: tuple[float, ...]) -> None:
    rng = np.random.default_rng(7)
    bounds = np.asarray(buckets)
    # Values on every bound (inclusive `le`), just beside them, and spread widely.
    values = np.concatenate(
        [
            bounds,
            np.nextafter(bounds, np.inf),
            np.nextafter(bounds, -np.inf),
            rng.normal(scale=3 * float(np.abs(bounds).max()), size=500),
            [np.inf, -1e300, 1e300, 0.0],
        ]
    )
    bulk_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x", "values", "kind", buckets)
    bulk_registry.register(bulk)
    reference = Histogram("x", "values", ["kind"], buckets=buckets, registry=reference_registry)
    for chunk in np.array_split(values, 7):  # several bulk observations per series
        bulk.observe_many("a", chunk)
    for value in values:
        reference.labels("a").observe(float(value))
    bulk.observe_many("b", values[:0])  # an empty observation still creates the series
    reference.labels("b")

    assert _samples(bulk_registry, "x") == _samples(reference_registry, "x")


def test_bulk_histogram_skips_nan_like_client_histogram() -> None:
    bulk_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x", "values", "kind", FRACTION_BUCKETS)
    bulk_registry.register(bulk)
    reference = Histogram(
        "x", "values", ["kind"], buckets=FRACTION_BUCKETS, registry=reference_registry
    )
    values = np.array([0.25, np.nan, 0.75])
    bulk.observe_many("a", values)
    for value in values:
        reference.labels("a").observe(float(value))
    bulk_samples, reference_samples = (
        _samples(bulk_registry, "x"),
        _samples(reference_registry, "x"),
    )
    # client_python counts NaN in no bucket (so not in _count) but adds it to _sum.
    key = ("x_sum", (("kind", "a"),))
    assert np.isnan(reference_samples.pop(key))
    assert bulk_samples.pop(key) == 1.0
    assert bulk_samples == reference_samples


def test_metrics_on_a_fresh_registry_start_empty() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    assert registry.get_sample_value("hingeloss_inflight_requests") == 0
    assert registry.get_sample_value("hingeloss_received_bytes_total") == 0
    # Labelled families have no series until first used (no made-up label values).
    assert (
        registry.get_sample_value("hingeloss_requests_total", {"loss": "x", "code": "OK"}) is None
    )
    families = {f.name for f in registry.collect()}
    assert "hingeloss_margin" in families
