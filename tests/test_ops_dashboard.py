"""The Grafana dashboard only queries series that Metrics exports, with labels those series carry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from inspectd.daemon.metrics import STAGES, Metrics
from inspectd.streams.schema import VERDICT_NG, VERDICT_OK, Result

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana" / "inspectd-dashboard.json"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"\b(inspectd_[A-Za-z0-9_:]*)")
SELECTOR = re.compile(r"\b(inspectd_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(inspectd_[A-Za-z0-9_:]*)[^,]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")


def exercised() -> Metrics:
    """A Metrics on which every helper ran once, so every labelled series exists."""
    m = Metrics()
    m.received("hazelnut", "line1")
    for verdict, score in ((VERDICT_OK, 0.1), (VERDICT_NG, 0.9)):
        m.scored(Result("hazelnut", "line1", "f1", 1000.0, score, verdict, 0.5, "winclip", "3",
                        timings={s: 0.01 for s in STAGES[:5]}), publish_s=0.002, now=1000.5)
    m.dead_lettered("hazelnut", "line1", "decode_failed")
    m.batch(8)
    m.queue_depth("inbox", 3)
    m.redis_pending("inspect:{line1}:frames", 5)
    m.product_reloaded("hazelnut", 3, "winclip")
    m.product_reload_failed("hazelnut")
    m.error("publish")
    m.set_model_info({"arch": "ViT-B-16", "pretrained": "laion400m_e32", "device": "cpu", "dtype": "float32",
                      "kernels": "onednn", "gemm": "blas", "demo_weights": "false"})
    m.camera_dropped("cam0", 2)
    m.camera_state("cam0", True, 1, 250, 0.04)
    m.console_feedback.labels(product="hazelnut", action="false_alarm").inc()
    m.review_skipped.labels(verdict="OK", reason="rate").inc()
    return m


def exported(m: Metrics) -> tuple[set[str], dict[str, tuple[str, set[str]]]]:
    """(sample names in the /metrics text, family name -> (type, label names seen on its samples))."""
    text = m.exposition().decode()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    families: dict[str, tuple[str, set[str]]] = {}
    for family in m.registry.collect():
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        families[family.name] = (family.type, labels)
    return samples, families


def family_of(name: str, families: dict[str, tuple[str, set[str]]]) -> tuple[str, str]:
    """(family name, kind of series) for a sample name; strips _bucket/_count/_sum only off histograms."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and families.get(base, ("",))[0] == "histogram":
            return base, suffix
    for suffix, kind in (("_total", "counter"), ("_info", "info")):
        base = name.removesuffix(suffix)
        if base != name and families.get(base, ("",))[0] == kind:
            return base, suffix
    return name, ""


def exprs(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: panel targets (also inside rows) and template variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key == "expr" or (key == "query" and "label_values" in value)):
                found.append(value)
            else:
                found.extend(exprs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(exprs(item))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_shape(dashboard: dict) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for name in ("product", "line"):
        assert variables[name]["type"] == "query"
        assert "label_values(" in variables[name]["query"]["query"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap"} <= kinds


def test_required_views_exist(dashboard: dict) -> None:
    text = "\n".join(exprs(dashboard))
    compact = re.sub(r"\s+", "", text)
    assert ('sumby(product,line)(rate(inspectd_frames_scored_total{verdict="NG",' in compact
            and "/sumby(product,line)(rate(inspectd_frames_scored_total{" in compact), "defect rate per product/line"
    for needle in ("histogram_quantile(0.5,", "histogram_quantile(0.99,", 'stage="end_to_end"',
                   "inspectd_batch_size_bucket", "sumby(reason)", "inspectd_product_reloads_total",
                   "inspectd_queue_depth", "inspectd_redis_pending_entries", "inspectd_anomaly_score_bucket"):
        assert needle in compact, needle


def test_every_expr_uses_exported_metrics_and_labels(dashboard: dict) -> None:
    samples, families = exported(exercised())
    queries = exprs(dashboard)
    assert len(queries) >= 15
    for expr in queries:
        bare = STRING.sub('""', expr)
        names = set(METRIC.findall(bare))
        assert names, f"no inspectd metric in {expr!r}"
        usable: set[str] = set(TARGET_LABELS)
        for name in names:
            assert name in samples, f"{name} (in {expr!r}) is not exported by Metrics"
            family, suffix = family_of(name, families)
            assert family in families, f"{name}: no family {family}"
            kind, labels = families[family]
            if suffix in HISTOGRAM_SUFFIXES:
                assert kind == "histogram", name
            usable |= labels | ({"le"} if suffix == "_bucket" else set())
        for name, body in SELECTOR.findall(bare):
            family, suffix = family_of(name, families)
            allowed = families[family][1] | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
            for key in MATCHER_KEY.findall(body):
                assert key in allowed, f"{name} has no label {key!r} (in {expr!r})"
        for group in GROUPING.findall(bare):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in usable, f"grouping by {label!r}, which no series in {expr!r} carries"
        for name, label in LABEL_VALUES.findall(bare):
            assert label in families[family_of(name, families)[0]][1], f"label_values({name}, {label})"


def test_checker_catches_an_unknown_metric() -> None:
    samples, families = exported(exercised())
    assert "inspectd_frames_scoredd_total" not in samples
    assert family_of("inspectd_stage_duration_seconds_bucket", families) == ("inspectd_stage_duration_seconds",
                                                                             "_bucket")
    assert family_of("inspectd_frames_scored_total", families) == ("inspectd_frames_scored", "_total")
    assert family_of("inspectd_product_state_info", families) == ("inspectd_product_state", "_info")
