"""Every Prometheus metric of the daemon, on its own CollectorRegistry, plus the /metrics aiohttp handler.

One ``Metrics`` per daemon instance, so tests and several daemons in one process never collide.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from inspectd import __version__
from inspectd.streams.schema import VERDICT_NG, VERDICT_OK, Result

try:  # generate_latest writes text format 0.0.4; newer clients moved CONTENT_TYPE_LATEST to 1.0.0
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # prometheus-client < 0.22
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

# Stages timed per frame; the first four come from Frame/Result.timings, publish and end_to_end from the sink loop.
STAGES = ("queue_wait", "decode", "preprocess", "forward", "score", "publish", "end_to_end")
SCORE_BUCKETS = tuple(round(i * 0.05, 2) for i in range(1, 21))  # 0.05 .. 1.0 (+Inf catches >1 scores)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # past the top bucket, quantiles read its bound
MODEL_INFO_KEYS = ("arch", "pretrained", "device", "dtype", "kernels", "gemm", "demo_weights")


class _ProductEntryLike(Protocol):
    """What ``product_changed`` reads from a registry entry (daemon.registry.ProductEntry)."""

    version: int
    config: Any  # has .detector


UNKNOWN_PRODUCT_LABEL = "_unknown"  # the product label of frames naming no known product


class Metrics:
    """The daemon's metric objects (attributes) and the small helpers the hot path calls."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "inspectd") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace

        self.frames_received = Counter("frames_received",
                                       "Frames read from a source (received = scored + dead-lettered + in flight).",
                                       ["product", "line"], namespace=ns, registry=r)
        self.frames_scored = Counter("frames_scored", "Frames scored and published; defect rate = NG / all.",
                                     ["product", "line", "verdict"], namespace=ns, registry=r)
        self.frames_dead_lettered = Counter("frames_dead_lettered", "Frames that ended as dead letters.",
                                            ["product", "line", "reason"], namespace=ns, registry=r)
        self.anomaly_score = Histogram("anomaly_score", "Image-level anomaly score of scored frames.",
                                       ["product"], buckets=SCORE_BUCKETS, namespace=ns, registry=r)
        self.stage_duration = Histogram("stage_duration_seconds", "Per-frame time spent in each pipeline stage.",
                                        ["stage"], buckets=STAGE_BUCKETS, namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "Frames per engine forward batch.",
                                    buckets=BATCH_BUCKETS, namespace=ns, registry=r)
        self.queue_depth_gauge = Gauge("queue_depth", "Frames waiting in an internal queue.",
                                       ["queue"], namespace=ns, registry=r)
        self.redis_pending_entries = Gauge("redis_pending_entries",
                                           "Entries delivered to this consumer group but not yet acked.",
                                           ["stream"], namespace=ns, registry=r)
        self.product_state_version = Gauge("product_state_version", "Version of the product state now serving.",
                                           ["product"], namespace=ns, registry=r)
        self.product_state_info = Info("product_state", "Detector and version serving a product (value 1).",
                                       ["product"], namespace=ns, registry=r)
        self.product_reloads = Counter("product_reloads", "Product state builds/reloads by outcome (ok|error).",
                                       ["product", "outcome"], namespace=ns, registry=r)
        self.errors = Counter("errors", "Errors the daemon survived, by kind (source, score, publish, ack, ...).",
                              ["kind"], namespace=ns, registry=r)
        self.model_info = Info("model", "Each CLIP backbone of the model pool (value 1, `model`: its name); "
                               "demo_weights=true means random weights.", ["model"], namespace=ns, registry=r)
        self.camera_frames_dropped = Counter("camera_frames_dropped", "Camera frames dropped by the capture policy.",
                                             ["source"], namespace=ns, registry=r)
        self.camera_connected = Gauge("camera_connected", "1 while the camera delivers a stream, else 0.",
                                      ["camera"], namespace=ns, registry=r)
        self.camera_reconnects = Gauge("camera_reconnects", "Reconnects of the camera since the daemon started.",
                                       ["camera"], namespace=ns, registry=r)
        self.camera_frames_captured = Gauge("camera_frames_captured", "Frames captured since the daemon started.",
                                            ["camera"], namespace=ns, registry=r)
        self.camera_capture_errors = Gauge("camera_capture_errors",
                                           "Exceptions the camera's capture backend raised (open, read, release) since "
                                           "the daemon started; each ends that stream (reconnect or end).",
                                           ["camera"], namespace=ns, registry=r)
        self.camera_seconds_since_frame = Gauge("camera_seconds_since_frame",
                                                "Seconds since the camera's newest frame (since start when none).",
                                                ["camera"], namespace=ns, registry=r)
        self.product_build_progress = Gauge(
            "product_build_progress", "Fraction (0..1) of the product build in progress; absent when none runs.",
            ["product"], namespace=ns, registry=r)
        self.console_feedback = Counter("console_feedback", "Operator feedback from the console, by action "
                                        "(false_alarm | defect | undo).", ["product", "action"], namespace=ns,
                                        registry=r)
        self.review_frames = Gauge("console_review_frames", "Frames held in the console's review buffer.",
                                   namespace=ns, registry=r)
        self.review_skipped = Counter("console_review_skipped", "Scored frames worth reviewing that were not "
                                      "rendered for the console: over console.ng_per_s/ok_per_s (rate) or the "
                                      "render queue was full (queue_full).", ["verdict", "reason"], namespace=ns,
                                      registry=r)
        self.up = Gauge("up", "1 while the daemon process runs.", namespace=ns, registry=r)
        self.build_info = Info("build", "inspectd build (value 1).", namespace=ns, registry=r)
        self.start_time = Gauge("start_time_seconds", "Unix time the daemon started.", namespace=ns, registry=r)

        self.up.set(1)
        self.start_time.set(time.time())
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self._seen_lines: set[tuple[str, str]] = set()
        # Product ids in frames are chosen by producers: only products the registry knows get their own label
        # value (anything else is counted as UNKNOWN_PRODUCT), so made-up names cannot grow /metrics.
        self.is_known: Callable[[str], bool] = lambda _product: True

    def product_label(self, product: str) -> str:
        return product if self.is_known(product) else UNKNOWN_PRODUCT_LABEL

    # ------------------------------------------------------------------ frames
    def received(self, product: str, line: str, n: int = 1) -> None:
        product = self.product_label(product)
        self.frames_received.labels(product, line).inc(n)
        if (product, line) not in self._seen_lines:  # NG rate reads 0, not absent, before the first NG
            self._seen_lines.add((product, line))
            for verdict in (VERDICT_OK, VERDICT_NG):
                self.frames_scored.labels(product, line, verdict)

    def scored(self, result: Result, publish_s: float | None = None, now: float | None = None) -> None:
        """Count one published Result and observe its score and stage timings (end_to_end from captured_at)."""
        self.frames_scored.labels(result.product, result.line, result.verdict).inc()
        self.anomaly_score.labels(result.product).observe(result.score)
        self.observe_stages(result.timings)
        if publish_s is not None:
            self.stage_duration.labels("publish").observe(max(0.0, publish_s))
        if result.captured_at > 0:
            end = time.time() if now is None else now
            self.stage_duration.labels("end_to_end").observe(max(0.0, end - result.captured_at))

    def observe_stages(self, timings: Mapping[str, float]) -> None:
        """Observe every known stage present in ``timings`` (stage -> seconds); unknown keys are ignored."""
        for stage, seconds in timings.items():
            if stage in STAGES:
                self.stage_duration.labels(stage).observe(max(0.0, seconds))

    def stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage).observe(max(0.0, seconds))

    def dead_lettered(self, product: str, line: str, reason: str) -> None:
        self.frames_dead_lettered.labels(self.product_label(product), line, str(reason)).inc()

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    # ------------------------------------------------------------------ gauges
    def queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth_gauge.labels(queue).set(depth)

    def redis_pending(self, stream: str, pending: int) -> None:
        self.redis_pending_entries.labels(stream).set(pending)

    # ------------------------------------------------------------------ products, model, errors
    def product_reloaded(self, product: str, version: int, detector: str) -> None:
        """A new state for ``product`` is serving: outcome ok, version gauge and info replaced."""
        self.product_reloads.labels(product, "ok").inc()
        self.product_state_version.labels(product).set(version)
        self.product_state_info.labels(product).info({"detector": detector, "version": str(version)})

    def product_reload_failed(self, product: str) -> None:
        """A build was rejected; the previous state (if any) keeps serving, so its gauges stay."""
        self.product_reloads.labels(product, "error").inc()

    def build_progress(self, product: str, fraction: float | None) -> None:
        """Registry progress hook (called from build threads): a fraction while building, None when done."""
        if fraction is None:
            with contextlib.suppress(KeyError):
                self.product_build_progress.remove(product)
        else:
            self.product_build_progress.labels(product=product).set(fraction)

    def product_removed(self, product: str) -> None:
        for metric in (self.product_state_version, self.product_state_info):
            with contextlib.suppress(KeyError):
                metric.remove(product)

    def product_changed(self, product: str, entry: _ProductEntryLike | None) -> None:
        """Registry on_change hook: an entry means a new version serves; None means a rejected build.

        (The registry also signals removal with None; call ``product_removed`` for that.)
        """
        if entry is None:
            self.product_reload_failed(product)
        else:
            self.product_reloaded(product, int(entry.version), str(entry.config.detector))

    def set_model_info(self, info: Mapping[str, Any], model: str = "default") -> None:
        """``info`` as from ClipBackbone.describe() for the pool's model ``model``; missing keys become "" so the
        label set is fixed."""
        self.model_info.labels(model).info({k: str(info.get(k, "")) for k in MODEL_INFO_KEYS})

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def camera_dropped(self, source: str, n: int = 1) -> None:
        self.camera_frames_dropped.labels(source).inc(n)

    def camera_state(self, camera: str, connected: bool, reconnects: int, frames: int, since_frame_s: float,
                     capture_errors: int = 0) -> None:
        self.camera_connected.labels(camera).set(1 if connected else 0)
        self.camera_capture_errors.labels(camera).set(capture_errors)
        self.camera_reconnects.labels(camera).set(reconnects)
        self.camera_frames_captured.labels(camera).set(frames)
        self.camera_seconds_since_frame.labels(camera).set(round(since_frame_s, 3))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp GET handler serving ``metrics`` in the Prometheus text format."""

    async def handle(_request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    return handle
