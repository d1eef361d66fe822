"""The console's review buffer: a bounded window of recently scored frames (downscaled image, overlay, mask)
people may look at, per-product NG rates, dead letters by reason, and the live-update fan-out.

Nothing here is unbounded: ``keep_ng`` / ``keep_ok`` frames (newest; in memory, or in Redis streams capped by
MAXLEN with ``console.review: redis``, see `review_redis`), their originals within ``original_budget_mb`` (either
way), ``stats_window`` verdicts and one hour of timestamps per product, a bounded capture queue (a frame that finds
it full is not kept for review and counted) and a bounded queue per live subscriber (a slow browser loses its oldest
updates, never slows the pipeline).
Rendering runs in a worker thread, after the frame is published and acked.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from inspectd.daemon.config import ConsoleConfig
from inspectd.streams.codec import DecodeLimits, decode_frame_image, encode_mask_png, encode_png
from inspectd.streams.overlay import annotate, overlay
from inspectd.streams.schema import DeadLetter, Frame, Result

log = logging.getLogger(__name__)

THUMB_SIDE = 200
HOUR_S = 3600.0
CAPTURE_QUEUE = 32
SUBSCRIBER_QUEUE = 256
FAILURE_LOG_S = 60.0  # frames that could not be kept for review are logged at most this often
UNKNOWN_PRODUCT = "_unknown"  # as the metrics' label for products no registry knows


def downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` (uint8 HxWx3) shrunk so its longer side is at most ``max_side`` (area resampling)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(image)
    import cv2

    scale = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _jpeg(array: np.ndarray, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class RateLimit:
    """A token bucket: ``allow()`` at most ``rate`` times a second on average, bursts up to ``max(1, rate)``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.at = time.monotonic()

    def allow(self) -> bool:
        if self.rate <= 0:
            return False
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class ReviewItem:
    """One frame kept for review: its result's fields and the pictures the console shows."""

    id: str
    result: dict[str, Any]  # the summary the console lists (see `summary`)
    image_png: bytes  # the frame at review size, lossless
    overlay_jpeg: bytes  # heat map over the frame, with the score/threshold/verdict legend
    thumb_jpeg: bytes
    mask_png: bytes | None  # the raw map, 8-bit, 255 = mask_scale (as published), at most review size
    amap: np.ndarray | None  # float map, at most review size (for a defect's saved mask)
    original: bytes | None = None  # the frame as it was scored (what feedback saves), while the budget allows
    original_suffix: str = ".png"
    feedback: dict[str, Any] | None = None  # the latest feedback on this frame (None, or its log record)

    def summary(self) -> dict[str, Any]:
        return {**self.result, "id": self.id, "has_mask": self.mask_png is not None, "feedback": self.feedback}


ORIENTATION = 0x0112  # the EXIF tag decoding applies (`codec`)
ORIGINAL_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}  # MPO: a JPEG


def original_of(frame: Frame, decoded: np.ndarray) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, file suffix, (width, height)) of the frame as it was scored: an encoded image as sent; raw pixels, a
    source's own image or an image with an EXIF orientation as a PNG of ``decoded`` (the frame's pixels, full size,
    turned as scored: the eval folder's reader does not turn images, so its mask would not fit the file sent)."""
    if frame.raw_shape is None and frame.payload:
        with Image.open(io.BytesIO(frame.payload)) as img:
            if img.format in ORIGINAL_SUFFIXES and img.getexif().get(ORIENTATION, 1) in (0, 1):
                return frame.payload, ORIGINAL_SUFFIXES[img.format], img.size
    return encode_png(decoded), ".png", (int(decoded.shape[1]), int(decoded.shape[0]))


def render_item(item_id: str, result: Result, frame: Frame, keep_original: bool = False,
                max_side: int | None = None, limits: DecodeLimits | None = None) -> ReviewItem:
    """Pictures of one result (runs in a worker thread): ``frame`` is decoded again and shrunk to ``max_side``
    here, for the few frames rendered, not at decode for every frame. The colours span the map's own range (the
    legend gives it), so a low-contrast map still shows where it is highest; the outline marks map >= threshold.
    With ``keep_original``, the item keeps the frame as scored (`original_of`)."""
    full = decode_frame_image(frame, limits)
    frame_size = (int(full.shape[1]), int(full.shape[0]))
    image = full if max_side is None else downscale(full, max_side)
    amap = None if result.mask is None else np.asarray(result.mask, dtype=np.float32)
    if amap is not None:
        if amap.ndim == 3:
            amap = amap.reshape(amap.shape[-2:]) if amap.shape[0] == 1 else amap[..., 0]
        if max_side is not None:
            amap = downscale(np.ascontiguousarray(amap), max_side)  # a full-size 4K map is 48 MB
        vmin, vmax = float(amap.min()), float(amap.max()) + 1e-6
        drawn = overlay(image, amap, result.threshold, vmin=vmin, vmax=vmax)
    else:
        vmin, vmax, drawn = 0.0, 1.0, np.ascontiguousarray(image)
    label = f"{result.product} / {result.frame_id}"
    annotated = annotate(drawn, score=result.score, threshold=result.threshold, verdict=result.verdict,
                         vmin=vmin, vmax=vmax, label=label)
    mask_png = None if amap is None else encode_mask_png(amap / (result.mask_scale or 1.0))
    original, suffix = None, ".png"
    if keep_original:
        original, suffix, frame_size = original_of(frame, full)
    summary = {
        "product": result.product, "line": result.line, "frame_id": result.frame_id,
        "entry_id": result.entry_id or "", "ts": result.captured_at, "score": float(result.score),
        "threshold": float(result.threshold), "verdict": result.verdict, "detector": result.detector,
        "state_version": result.state_version, "demo_weights": bool(result.demo_weights),
        "size": [int(image.shape[1]), int(image.shape[0])], "frame_size": list(frame_size), "kept_at": time.time(),
    }
    return ReviewItem(item_id, summary, encode_png(image), _jpeg(annotated), _jpeg(downscale(drawn, THUMB_SIDE), 80),
                      mask_png, amap, original, suffix)


@dataclass
class ProductStats:
    """Verdict counts of one product: the last N frames and the last hour (per-minute buckets); dead letters."""

    window: int
    recent: deque = field(default_factory=deque)  # True = NG, newest last
    minutes: deque = field(default_factory=deque)  # [minute, frames, ng], oldest first, at most 60
    dead: Counter = field(default_factory=Counter)
    scored: int = 0

    def add(self, is_ng: bool, now: float) -> None:
        self.scored += 1
        self.recent.append(is_ng)
        if len(self.recent) > self.window:
            self.recent.popleft()
        minute = int(now // 60)
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append([minute, 0, 0])
        self.minutes[-1][1] += 1
        self.minutes[-1][2] += int(is_ng)
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self.minutes and self.minutes[0][0] <= int(now // 60) - int(HOUR_S // 60):
            self.minutes.popleft()

    def describe(self, now: float) -> dict[str, Any]:
        self._prune(now)
        frames_hour = sum(m[1] for m in self.minutes)
        ng_hour = sum(m[2] for m in self.minutes)
        return {
            "last_n": len(self.recent), "ng_last_n": sum(self.recent),
            "ng_rate_last_n": sum(self.recent) / len(self.recent) if self.recent else None,
            "frames_hour": frames_hour, "ng_hour": ng_hour,
            "ng_rate_hour": ng_hour / frames_hour if frames_hour else None,
            "scored": self.scored, "dead_letters": dict(self.dead),
        }


class ReviewHub:
    """Receives every published batch (`observe`), keeps stats and the review buffer, and tells subscribers."""

    def __init__(self, config: ConsoleConfig, metrics: Any = None, limits: DecodeLimits | None = None,
                 served: bool = True) -> None:
        """``served``: this daemon serves the console (http.enabled). Frames are kept only where someone can see
        them: its own console, or with ``console.review: redis`` every instance's."""
        self.config = config
        self.metrics = metrics
        self.limits = limits  # the daemon's decode limits: a frame it scored is decoded again under them to render
        self.keeping = config.enabled and (config.review == "redis" or served and config.review == "memory") \
            and (config.keep_ng + config.keep_ok) > 0
        self.stats: dict[str, ProductStats] = {}
        self._kept: dict[str, deque[ReviewItem]] = {"NG": deque(), "OK": deque()}
        self._limits = {"NG": config.keep_ng, "OK": config.keep_ok}
        self._items: dict[str, ReviewItem] = {}
        self._ids = itertools.count(1)
        self._boot = secrets.token_hex(3)  # ids differ across restarts: a cached picture never shows another frame
        self.is_known: Callable[[str], bool] = lambda _product: True  # the daemon sets: known to the registry
        self._originals: OrderedDict[str, ReviewItem] = OrderedDict()  # id -> item holding its original, oldest first
        self._original_bytes = 0
        self._capture: asyncio.Queue = asyncio.Queue(maxsize=CAPTURE_QUEUE)
        self._subscribers: set[asyncio.Queue] = set()
        self._worker: asyncio.Task | None = None
        self._tail: asyncio.Task | None = None
        self.store: Any = None  # review_redis.RedisReviewStore with console.review: redis
        self._claimed: set[str] = set()  # items a feedback action is under way on
        self._rates = {"NG": RateLimit(config.ng_per_s), "OK": RateLimit(config.ok_per_s)}
        self.skipped: dict[tuple[str, str], int] = {}  # (verdict, rate | queue_full) -> frames not rendered
        self._failed = 0  # frames whose picture could not be drawn or stored
        self._failure_logged = -FAILURE_LOG_S

    # ---------------------------------------------------------------- intake (the daemon's publish loop)
    def observe(self, results: Iterable[Result], dead: Iterable[DeadLetter],
                frames: dict[tuple[str, str | None, str], Frame]) -> None:
        """Count verdicts and dead letters; queue results worth reviewing for rendering. Never blocks.
        ``frames``: the scored frames (with their bytes or image) by (source, entry id, frame id)."""
        now = time.time()
        for letter in dead:
            self._stats(letter.product).dead[letter.reason] += 1
        for result in results:
            self._stats(result.product).add(result.verdict == "NG", now)
            found = frames.get((result.source, result.entry_id, result.frame_id))
            if found is None or not self._limits.get(result.verdict, 0) or result.line in self.config.skip_lines \
                    or result.product in self.config.skip_products:
                continue
            if not self._rates[result.verdict].allow():
                self._skipped(result.verdict, "rate")
                continue
            try:
                self._capture.put_nowait((result, found))
            except asyncio.QueueFull:
                self._skipped(result.verdict, "queue_full")
        if self._worker is None and self.keeping:
            self._worker = asyncio.create_task(self._render_loop(), name="console-review")

    def _skipped(self, verdict: str, reason: str) -> None:
        """A frame worth reviewing that is not rendered: over its verdict's rate, or the render queue is full."""
        self.skipped[(verdict, reason)] = self.skipped.get((verdict, reason), 0) + 1
        if self.metrics is not None:
            self.metrics.review_skipped.labels(verdict=verdict, reason=reason).inc()

    def _stats(self, product: str) -> ProductStats:
        if not self.is_known(product):  # producers choose product names: made-up ones share one entry
            product = UNKNOWN_PRODUCT
        stats = self.stats.get(product)
        if stats is None:
            stats = self.stats[product] = ProductStats(self.config.stats_window)
        return stats

    async def _render_loop(self) -> None:
        while True:
            result, frame = await self._capture.get()
            item_id = f"{self._boot}-{next(self._ids)}"
            try:
                item = await asyncio.to_thread(render_item, item_id, result, frame, self.config.keep_original,
                                               self.config.max_side, self.limits)
                if self.store is not None:
                    item.id = await self.store.add(item)  # the live feed hears of it from the stream (every instance)
                    continue
            except Exception:  # noqa: BLE001 - a picture that cannot be drawn or stored costs only its review entry
                self._failed += 1
                now = time.monotonic()
                if now - self._failure_logged >= FAILURE_LOG_S:  # the review store down: not a traceback a frame
                    self._failure_logged = now
                    log.exception("console: could not keep frame %s/%s for review (%d not kept so far)",
                                  result.product, result.frame_id, self._failed)
                continue
            self._keep(item)
            self.publish("frame", item.summary())

    def _keep(self, item: ReviewItem) -> None:
        kept = self._kept[item.result["verdict"]]
        kept.append(item)
        self._items[item.id] = item
        while len(kept) > self._limits[item.result["verdict"]]:
            gone = kept.popleft()
            self._items.pop(gone.id, None)
            # out of the originals' queue too: a queue holding evicted items (behind a rare NG at its front)
            # kept every OK frame's pictures and mask alive, hundreds of MB an hour outside the byte budget
            self._originals.pop(gone.id, None)
            if gone.original is not None:
                self._original_bytes -= len(gone.original)
                gone.original = None
        if item.original is not None:  # originals within a byte budget, the oldest give theirs up first
            self._originals[item.id] = item
            self._original_bytes += len(item.original)
            budget = self.config.original_budget_mb * 1024 * 1024
            while self._original_bytes > budget and self._originals:
                _, oldest = self._originals.popitem(last=False)
                if oldest.original is not None:
                    self._original_bytes -= len(oldest.original)
                    oldest.original = None
        if self.metrics is not None:
            self.metrics.review_frames.set(len(self._items))

    # ---------------------------------------------------------------- the Redis store (console.review: redis)
    def use_store(self, store: Any) -> None:
        """Keep review items in ``store`` (a `review_redis.RedisReviewStore`) instead of this process's memory, its
        originals within ``original_budget_mb`` (in Redis, every instance's together), as in memory."""
        store.original_budget = self.config.original_budget_mb * 1024 * 1024
        self.store = store
        self._tail = asyncio.create_task(store.tail(self._heard, self._counted), name="console-review-tail")

    def _heard(self, summary: dict[str, Any]) -> None:
        summary["feedback"] = None  # a frame just added has none
        self.publish("frame", summary)

    def _counted(self, kept: int) -> None:
        if self.metrics is not None:
            self.metrics.review_frames.set(kept)

    # ---------------------------------------------------------------- reads (the console's routes)
    def get(self, item_id: str) -> ReviewItem | None:
        """An item held in memory (``console.review: memory``)."""
        return self._items.get(item_id)

    def items(self, product: str | None = None, line: str | None = None, limit: int = 100) -> list[ReviewItem]:
        """Items held in memory: NG first, then OK; newest first within each."""
        out = []
        for verdict in ("NG", "OK"):
            chosen = [i for i in reversed(self._kept[verdict])
                      if (product is None or i.result["product"] == product)
                      and (line is None or i.result["line"] == line)]
            out += chosen
        return out[:limit]

    async def fetch(self, item_id: str) -> ReviewItem | None:
        """An item by id, from memory or the Redis store, with the feedback given on it."""
        item = self._items.get(item_id)
        if item is None and self.store is not None:
            item = await self.store.get(item_id)  # with the feedback any instance recorded on it
        return item

    async def listing(self, product: str | None = None, line: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        """Summaries, NG first, newest first within each, from memory or the Redis store."""
        if self.store is None:
            return [i.summary() for i in self.items(product, line, limit)]
        chosen = [s for s in await self.store.summaries(max(self._limits.values()))
                  if (product is None or s["product"] == product) and (line is None or s["line"] == line)]
        return chosen[:limit]

    async def kept(self) -> int:
        return len(self._items) if self.store is None else await self.store.count()

    async def claim(self, item: ReviewItem) -> bool:
        """Reserve ``item`` for one feedback action: False when it has feedback (or one is under way), also on
        another instance's console with ``review: redis``. `set_feedback` (or `release`) ends the claim."""
        if item.feedback is not None or item.id in self._claimed:
            return False
        if self.store is not None and not await self.store.claim(item.id):
            return False
        self._claimed.add(item.id)
        return True

    async def release(self, item: ReviewItem) -> None:
        """Give up a claim whose action failed."""
        self._claimed.discard(item.id)
        if self.store is not None:
            await self.store.release(item.id)

    async def set_feedback(self, item: ReviewItem, record: dict[str, Any] | None) -> None:
        """Record (or, with None, clear) the feedback on ``item`` and tell the live pages."""
        self._claimed.discard(item.id)
        item.feedback = record
        if self.store is not None:
            await self.store.mark(item.id, record)
        self.publish("feedback", item.summary())

    def product_stats(self, product: str) -> dict[str, Any]:
        return self._stats(product).describe(time.time())

    # ---------------------------------------------------------------- live updates
    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def subscribers(self) -> int:
        return len(self._subscribers)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def publish(self, event: str, data: dict[str, Any] | None) -> None:
        """Send ``event`` to every subscriber; one that is full loses its oldest update (never blocks)."""
        for queue in list(self._subscribers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((event, data))

    async def close(self) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)  # the SSE handlers end their streams
        for task in (self._worker, self._tail):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
