"""The Grafana dashboard shows what its panel titles say, at a precision its queries need, and its PromQL
follows the series' types (rate over counters and buckets only, quantiles grouped by le). Found by a review
helper."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_ops_dashboard import exercised, exported, exprs, family_of

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana" / "inspectd-dashboard.json"
RANGE_FUNCTIONS = re.compile(r"\b(rate|irate|increase)\s*\(\s*(inspectd_[A-Za-z0-9_:]*)")
QUANTILE = re.compile(r"histogram_quantile\s*\(\s*[0-9.]+\s*,\s*sum\s+by\s*\(([^)]*)\)")
# words of a panel title -> the series a panel with that title must query
TITLE_PROMISES = {
    "reconnect": "inspectd_camera_reconnects",
    "dropped": "inspectd_camera_frames_dropped_total",
    "connected": "inspectd_camera_connected",
    "last frame": "inspectd_camera_seconds_since_frame",
    "dead letter": "inspectd_frames_dead_lettered_total",
    "reloads": "inspectd_product_reloads_total",
    "errors by kind": "inspectd_errors_total",
    "queue depth": "inspectd_queue_depth",
    "pending": "inspectd_redis_pending_entries",
    "batch size": "inspectd_batch_size",
    "feedback": "inspectd_console_feedback_total",
    "not kept": "inspectd_console_review_skipped_total",
    "anomaly score": "inspectd_anomaly_score_bucket",
}


@pytest.fixture(scope="module")
def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_every_panel_queries_what_its_title_names(panels: list[dict]) -> None:
    """'Camera frames dropped (keep-newest) and reconnects' queried the drops only: reconnects were on no panel."""
    for panel in panels:
        queries = " ".join(exprs(panel["targets"]))
        for words, series in TITLE_PROMISES.items():
            if words in panel["title"].lower():
                assert series in queries, f"{panel['title']!r} does not query {series}"


def test_no_two_panels_show_the_same_queries(panels: list[dict]) -> None:
    seen: dict[tuple[str, ...], str] = {}
    for panel in panels:
        key = tuple(sorted(re.sub(r"\s+", "", e) for e in exprs(panel["targets"])))
        assert key not in seen, f"{panel['title']!r} repeats {seen[key]!r}"
        seen[key] = panel["title"]


def test_a_panel_of_per_second_rates_is_not_rounded_to_whole_numbers(panels: list[dict]) -> None:
    """decimals: 0 on a rate() showed 0.4 dropped frames/s (a camera losing a frame every 2.5 s) as 0."""
    for panel in panels:
        if any("rate(" in e for e in exprs(panel["targets"])):
            decimals = panel.get("fieldConfig", {}).get("defaults", {}).get("decimals")
            assert decimals is None or decimals >= 2, f"{panel['title']!r}: decimals {decimals}"


def test_range_functions_only_over_counters_and_histogram_series_and_quantiles_by_le(panels: list[dict]) -> None:
    _, families = exported(exercised())
    for panel in panels:
        for expr in exprs(panel["targets"]):
            for function, name in RANGE_FUNCTIONS.findall(expr):
                family, suffix = family_of(name, families)
                kind = families[family][0]
                assert (kind, suffix) in (("counter", "_total"), ("histogram", "_bucket"), ("histogram", "_sum"),
                                          ("histogram", "_count")), f"{function}() over {kind} {name} in {expr!r}"
            for grouping in QUANTILE.findall(expr):
                assert "le" in {g.strip() for g in grouping.split(",")}, expr
            assert expr.count("histogram_quantile") == len(QUANTILE.findall(expr)), f"ungrouped quantile: {expr!r}"
