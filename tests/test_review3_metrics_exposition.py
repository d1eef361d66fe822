"""What the dashboard's quantiles read off /metrics, parsed with prometheus_client's own parser and computed
the way Prometheus's histogram_quantile does. Found by a review helper."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from inspectd.daemon.metrics import Metrics


def buckets(m: Metrics, family: str, **labels: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one histogram series, from the text exposition, sorted by le."""
    found = []
    for metric in text_string_to_metric_families(m.exposition().decode()):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.name == f"{family}_bucket" and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((float(sample.labels["le"]), sample.value))
    return sorted(found)


def histogram_quantile(q: float, series: list[tuple[float, float]]) -> float:
    """Prometheus's algorithm: linear inside the bucket holding the rank; the +Inf bucket answers with the
    upper bound of the highest finite one."""
    total = series[-1][1]
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in series:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            return previous_le + (le - previous_le) * (rank - previous_count) / (count - previous_count)
        previous_le, previous_count = le, count
    return math.nan


def test_batch_size_quantiles_reach_a_batch_limit_above_64() -> None:
    """batcher.max_batch_size may be 96 (README: compiled batch buckets go to 48 and beyond on a GPU): the
    dashboard's p50/p99 batch size read 64, the top bucket, however full the batches were."""
    m = Metrics()
    for _ in range(50):
        m.batch(96)
    for _ in range(50):
        m.batch(200)
    series = buckets(m, "inspectd_batch_size")
    assert 64 < histogram_quantile(0.25, series) <= 128
    assert 128 < histogram_quantile(0.99, series) <= 256


def test_batch_size_quantiles_of_small_batches_are_unchanged() -> None:
    m = Metrics()
    for size in (1, 3, 8, 8):
        m.batch(size)
    series = buckets(m, "inspectd_batch_size")
    assert histogram_quantile(0.99, series) <= 8
    assert histogram_quantile(0.25, series) == 1
