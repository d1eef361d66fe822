"""Metrics: required names/labels on a private registry, helper semantics, and the /metrics handler."""

from __future__ import annotations

import platform
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from inspectd import __version__
from inspectd.daemon.metrics import Metrics, metrics_handler
from inspectd.streams.schema import VERDICT_NG, Result


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_instances_do_not_collide_and_stay_off_the_global_registry() -> None:
    a, b = Metrics(), Metrics()
    a.received("p", "l")
    assert value(a, "inspectd_frames_received_total", product="p", line="l") == 1
    assert value(b, "inspectd_frames_received_total", product="p", line="l") is None
    assert REGISTRY.get_sample_value("inspectd_up") is None
    assert value(a, "inspectd_up") == 1


def test_received_makes_ng_rate_zero_not_absent() -> None:
    m = Metrics()
    m.received("p", "l", 3)
    assert value(m, "inspectd_frames_received_total", product="p", line="l") == 3
    assert value(m, "inspectd_frames_scored_total", product="p", line="l", verdict="NG") == 0
    assert value(m, "inspectd_frames_scored_total", product="p", line="l", verdict="OK") == 0


def test_scored_counts_verdict_score_and_stage_timings() -> None:
    m = Metrics()
    result = Result("p", "l", "f", 100.0, 0.83, VERDICT_NG, 0.5, "winclip", "2",
                    timings={"queue_wait": 0.004, "decode": 0.002, "forward": 0.03, "bogus": 1.0})
    m.scored(result, publish_s=0.003, now=100.25)
    assert value(m, "inspectd_frames_scored_total", product="p", line="l", verdict="NG") == 1
    assert value(m, "inspectd_anomaly_score_count", product="p") == 1
    assert value(m, "inspectd_anomaly_score_bucket", product="p", le="0.8") == 0
    assert value(m, "inspectd_anomaly_score_bucket", product="p", le="0.85") == 1
    for stage, seconds in (("queue_wait", 0.004), ("decode", 0.002), ("forward", 0.03), ("publish", 0.003),
                           ("end_to_end", 0.25)):
        assert value(m, "inspectd_stage_duration_seconds_sum", stage=stage) == seconds, stage
    assert value(m, "inspectd_stage_duration_seconds_count", stage="bogus") is None


def test_batch_buckets_are_powers_of_two() -> None:
    m = Metrics()
    m.batch(5)
    assert value(m, "inspectd_batch_size_bucket", le="4.0") == 0
    assert value(m, "inspectd_batch_size_bucket", le="8.0") == 1
    assert value(m, "inspectd_batch_size_bucket", le="64.0") == 1


def test_product_changed_tracks_version_info_and_outcome() -> None:
    m = Metrics()
    m.product_changed("nut", SimpleNamespace(version=1, config=SimpleNamespace(detector="winclip")))
    m.product_changed("nut", SimpleNamespace(version=2, config=SimpleNamespace(detector="winclip")))
    assert value(m, "inspectd_product_state_version", product="nut") == 2
    assert value(m, "inspectd_product_state_info", product="nut", detector="winclip", version="2") == 1
    assert value(m, "inspectd_product_state_info", product="nut", detector="winclip", version="1") is None
    m.product_changed("nut", None)  # rejected build: old version keeps serving
    assert value(m, "inspectd_product_reloads_total", product="nut", outcome="ok") == 2
    assert value(m, "inspectd_product_reloads_total", product="nut", outcome="error") == 1
    assert value(m, "inspectd_product_state_version", product="nut") == 2
    m.product_removed("nut")
    m.product_removed("never-there")
    assert value(m, "inspectd_product_state_version", product="nut") is None


def test_gauges_errors_model_and_camera() -> None:
    m = Metrics()
    m.queue_depth("inbox", 7)
    m.redis_pending("inspect:{l}:frames", 11)
    m.error("ack")
    m.camera_dropped("cam0", 4)
    m.set_model_info({"arch": "ViT-B-16", "device": "cuda:0", "dtype": "float16", "demo_weights": "true"})
    assert value(m, "inspectd_queue_depth", queue="inbox") == 7
    assert value(m, "inspectd_redis_pending_entries", stream="inspect:{l}:frames") == 11
    assert value(m, "inspectd_errors_total", kind="ack") == 1
    assert value(m, "inspectd_camera_frames_dropped_total", source="cam0") == 4
    assert value(m, "inspectd_model_info", model="default", arch="ViT-B-16", pretrained="", device="cuda:0",
                 dtype="float16", kernels="", gemm="", demo_weights="true") == 1
    assert value(m, "inspectd_build_info", version=__version__, python=platform.python_version()) == 1


async def test_metrics_handler_serves_text_format() -> None:
    m = Metrics()
    m.received("p", "l")
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(m))
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = await response.text()
    assert 'inspectd_frames_received_total{line="l",product="p"} 1.0' in body
    assert "# TYPE inspectd_stage_duration_seconds histogram" in body
