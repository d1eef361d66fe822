"""The daemon: sources -> bounded inbox -> micro-batches -> engine -> sinks -> ack, with graceful shutdown.

Backpressure is one semaphore of ``batcher.queue_size`` permits: a source reads only as many frames
as there are free permits, and a permit comes back only when its frame's result (or dead letter) is
published and acked. So memory is bounded however many frames wait upstream (e.g. in Redis), and
nothing is dropped silently: every frame ends as a Result or a DeadLetter before its ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inspectd import allocator
from inspectd.daemon.batcher import MicroBatcher
from inspectd.daemon.config import DaemonConfig, ModelConfig
from inspectd.daemon.engine import PreparedFrame, ScoringEngine, auto_decode_threads, map_size_for
from inspectd.daemon.feedback import FeedbackStore, feedback_root
from inspectd.daemon.metrics import Metrics
from inspectd.daemon.registry import BUILDING, ProductEntry, ProductRegistry
from inspectd.daemon.review import ReviewHub
from inspectd.detectors import cpu_threads
from inspectd.detectors.backbone import ClipBackbone, ModelSpec
from inspectd.detectors.pipeline import ScoreItem
from inspectd.streams.codec import DecodeLimits
from inspectd.streams.reasons import Reason
from inspectd.streams.records import MaskPolicy
from inspectd.streams.retry import Backoff
from inspectd.streams.schema import VERDICT_NG, VERDICT_OK, DeadLetter, Frame, FrameError, Result

log = logging.getLogger(__name__)

READ_CHUNK = 64


@dataclass
class InFlight:
    """A frame between its source and its ack, holding one backpressure permit."""

    frame: Frame
    origin: Any  # the source object that produced it
    prepared: PreparedFrame | None = None
    parked: bool = False


def build_backbone(config: DaemonConfig, model: ModelConfig | None = None) -> ClipBackbone:
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    m = model or config.model
    return ClipBackbone(ModelSpec(arch=m.arch, pretrained=m.pretrained, device=m.device, precision=m.precision,
                                  quick_gelu=m.quick_gelu, threads=m.threads, cache_dir=m.cache_dir,
                                  demo=config.demo, window_chunk_tokens=m.window_chunk_tokens,
                                  cpu_kernels=m.cpu_kernels, cpu_gemm=m.cpu_gemm, resize=m.resize, compile=m.compile))


def decode_limits(config: DaemonConfig) -> DecodeLimits:
    """What a frame may be (bytes, pixels, JPEG scans) under ``decode``: scoring and the console's re-decode both
    check it."""
    return DecodeLimits(max_bytes=config.decode.max_bytes, max_pixels=config.decode.max_pixels,
                        max_jpeg_scans=config.decode.max_jpeg_scans)


def build_model_pool(config: DaemonConfig) -> dict[str, ClipBackbone]:
    """Every model of the config loaded once, by name; the first is the products' default."""
    return {m.name: build_backbone(config, m) for m in config.model_pool()}


GIL_SWITCH_INTERVAL_S = 0.0005


class InspectDaemon:
    """Wires sources, batcher, engine, registry and sinks; `run` until `request_stop`."""

    def __init__(self, config: DaemonConfig, backbone: ClipBackbone | Mapping[str, ClipBackbone] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        # the model pool (name -> backbone); one given backbone serves as the config's first model
        self.backbones: dict[str, ClipBackbone] = (
            {} if backbone is None else dict(backbone) if isinstance(backbone, Mapping)
            else {config.model_pool()[0].name: backbone})
        self.backbone: ClipBackbone | None = next(iter(self.backbones.values()), None)
        self.registry: ProductRegistry | None = None
        self.engine: ScoringEngine | None = None
        self.redis: Any = None
        self.sources: list[Any] = []
        self.sinks: list[Any] = []
        self.batcher: MicroBatcher[InFlight] = MicroBatcher(
            config.batcher.max_batch_size, config.batcher.max_delay_ms / 1000.0, config.batcher.queue_size)
        self._permits = asyncio.Semaphore(config.batcher.queue_size)
        self._in_flight = 0
        self._flights: dict[int, InFlight] = {}  # frames between read and ack (for keep-alive)
        self._reading: set[asyncio.Task] = set()  # readers inside source.read (not cancelled at shutdown)
        self._ready: asyncio.Queue = asyncio.Queue(maxsize=1)  # prepared batch waiting for the engine
        self._publish: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._stop = asyncio.Event()
        self._readers_done = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._parked: dict[int, tuple[InFlight, asyncio.Task]] = {}  # frames waiting for their product's build
        self.handed_back = 0  # parked frames a shutdown left unacked (redelivered): their product was still building
        self.http: Any = None
        # the console's recent frames, NG rates, live feed
        # (a daemon without its http server renders no review pictures nobody can see, unless they go to Redis)
        self.review = ReviewHub(config.console, self.metrics, decode_limits(config), served=config.http.enabled)
        self.feedback: FeedbackStore | None = None  # the console's feedback actions (once the registry exists)
        self.publisher: Any = None  # daemon.publisher.Publisher once the sinks are open
        self.watcher: Any = None  # daemon.watcher.RegistryWatcher when registry.watch
        self.control: Any = None  # daemon.control.ControlListener when redis.control_stream
        self.started = False
        self.frames_done = 0
        self.left_pending = 0  # frames still in flight when shutdown_timeout_s ran out
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.config
        # Python's default 5 ms switch interval lets the event loop keep the GIL while the engine thread, between
        # two torch ops, waits for it; 0.5 ms hands it back sooner (bench/RESULTS.md, daemon at batch limit 1)
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        allocator.apply(cfg.allocator)  # before a model loads here (one passed in was loaded before) and any batch
        if not self.backbones:
            # (the loading thread then frees its OpenMP team: the engine thread's must be the only one)
            self.backbones = await asyncio.to_thread(cpu_threads.released_team(build_model_pool), cfg)
            self.backbone = next(iter(self.backbones.values()))
        for name, backbone in self.backbones.items():  # every model of the pool, not only the first
            self.metrics.set_model_info(backbone.describe(), name)
        limits = decode_limits(cfg)
        devices = [b.device for b in self.backbones.values()]
        decode_threads = cfg.decode.threads if cfg.decode.threads >= 0 else auto_decode_threads(devices)
        self.engine = ScoringEngine(devices, decode_threads, limits,
                                    max_tiles=cfg.decode.max_tiles, keep_payload=self.review.keeping)
        self.registry = ProductRegistry(self.backbones, cfg.registry, on_change=self._on_registry_change,
                                        on_remove=self.metrics.product_removed,
                                        on_progress=self.metrics.build_progress, max_tiles=cfg.decode.max_tiles)
        registry = self.registry
        self.feedback = FeedbackStore(feedback_root(cfg), registry, self.metrics, max_pixels=cfg.decode.max_pixels) \
            if cfg.console.enabled else None
        self.metrics.is_known = lambda product: registry.status(product) is not None
        self.review.is_known = self.metrics.is_known
        if cfg.http.enabled:  # first, so /readyz says what is missing while Redis or the products come up
            from inspectd.daemon.http import start_http

            self.http = await start_http(self)
        if cfg.sources.redis or cfg.sinks.redis:
            self.redis = self._redis_client()
            await self._wait_for_redis()
        self._open_sinks()
        from inspectd.daemon.publisher import Publisher

        self.publisher = Publisher(self.sinks, self.metrics)
        from inspectd.daemon.watcher import RegistryWatcher

        built_from = await asyncio.to_thread(RegistryWatcher.snapshot, cfg) if cfg.registry.watch else None
        await self._load_products()
        await self._compile_models()
        if cfg.registry.watch:
            self.watcher = RegistryWatcher(self.registry, cfg)
            self.watcher.start(since=built_from)  # what changed while the products built is applied too
        if cfg.redis.control_stream:  # opt-in: a Redis-free setup (the demo) has no fleet to follow
            from inspectd.daemon.control import ControlListener

            if self.redis is None:
                self.redis = self._redis_client()
            self.control = ControlListener(self.redis, cfg.redis.control_stream, self.registry, self.metrics,
                                           persist=bool(cfg.registry.products_dir))
            await self.control.start()
        if cfg.console.enabled and cfg.console.review == "redis" and self.review.keeping:
            from inspectd.daemon.review_redis import RedisReviewStore

            if self.redis is None:
                self.redis = self._redis_client()
            self.review.use_store(RedisReviewStore(self.redis, cfg.redis.prefix,
                                                   {"NG": cfg.console.keep_ng, "OK": cfg.console.keep_ok}))
        await self._open_sources()
        self._tasks = [asyncio.create_task(self._batch_loop(), name="batcher"),
                       asyncio.create_task(self._engine_loop(), name="engine"),
                       asyncio.create_task(self._publish_loop(), name="publisher")]
        self._reader_tasks = [asyncio.create_task(self._read_loop(s), name=f"read:{i}")
                              for i, s in enumerate(self.sources)]
        self._tasks.append(asyncio.create_task(self._gauge_loop(), name="gauges"))
        self._tasks.append(asyncio.create_task(self._keep_alive_loop(), name="keep-alive"))
        self._tasks.append(asyncio.create_task(self._maintenance_loop(), name="maintenance"))
        self.started = True
        serving = [p for p in self.registry.ids() if self.registry.get(p) is not None]
        failed = [p for p in self.registry.ids() if self.registry.get(p) is None]
        log.info("inspectd started: %d source(s), %d sink(s), products serving %s%s, models %s", len(self.sources),
                 len(self.sinks), serving, f", FAILED {failed} (see GET /products)" if failed else "",
                 {n: b.describe() for n, b in self.backbones.items()})
        if not self.sources or not self.sinks:
            log.warning("the daemon has %d source(s) and %d sink(s): %s", len(self.sources), len(self.sinks),
                        "it will score nothing" if not self.sources else "results go nowhere")

    def _redis_client(self) -> Any:
        """The shared client (`redis_client`): its reads may block up to the longest of the source's and the
        control listener's and the review feed's blocks."""
        from inspectd.daemon.control import BLOCK_MS as CONTROL_BLOCK_MS
        from inspectd.daemon.review_redis import TAIL_BLOCK_MS
        from inspectd.streams.redis_client import redis_client

        return redis_client(self.config.redis.url, self.config.redis.cluster,
                            max(self.config.redis.block_ms, CONTROL_BLOCK_MS, TAIL_BLOCK_MS))

    async def _wait_for_redis(self) -> None:
        """Until Redis answers: retry with the shared backoff (not ready meanwhile, a log line per attempt at
        first, then every tenth), instead of dying with a traceback when the daemon starts before Redis."""
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                await self.redis.ping()
                if backoff.failures:
                    log.info("Redis at %s is reachable after %d attempt(s)", self.config.redis.url, backoff.failures)
                return
            except Exception as exc:  # noqa: BLE001 - any connection failure: wait and retry
                delay = backoff.next_delay()
                self.metrics.error("redis_connect")
                if backoff.failures <= 3 or backoff.failures % 10 == 0:
                    log.warning("Redis at %s is not reachable (%s); retrying in %.1fs (not ready until then)",
                                self.config.redis.url, exc, delay)
                await asyncio.sleep(delay)
        raise asyncio.CancelledError("stopped while waiting for Redis")

    def _open_sinks(self) -> None:
        cfg = self.config
        policies = self._mask_policy
        if cfg.sinks.redis:
            from inspectd.streams.redis_keys import StreamKeys
            from inspectd.streams.redis_sink import DeadLetterSink, RedisResultSink

            keys = StreamKeys(cfg.redis.prefix)
            self.sinks.append(RedisResultSink(self.redis, keys, maxlen=cfg.redis.results_maxlen, mask_policy=policies,
                                              dead_letters=DeadLetterSink(self.redis, keys),
                                              mask_bits=cfg.sinks.mask_bits))
        if cfg.sinks.jsonl:
            from inspectd.streams.jsonl import JsonlSink

            self.sinks.append(JsonlSink(cfg.sinks.jsonl, mask_dir=cfg.sinks.jsonl_masks_dir, mask_policy=policies,
                                        mask_bits=cfg.sinks.mask_bits))

    def _mask_policy(self, product: str) -> MaskPolicy | None:
        entry = self.registry.get(product) if self.registry else None
        return entry.mask_policy if entry else None

    async def _open_sources(self) -> None:
        cfg = self.config
        if cfg.sources.redis:
            from inspectd.streams.redis_keys import StreamKeys
            from inspectd.streams.redis_source import RedisStreamSource

            keys = StreamKeys(cfg.redis.prefix)
            streams = [keys.frames(line) for line in cfg.redis.lines]
            # One XREADGROUP spans all lines on one Redis; in a Cluster all keys of a command must share a hash
            # slot, so there it is one source (reader) per slot: a line, or lines whose hash tags collide.
            groups = [streams] if not cfg.redis.cluster else list(_by_slot(streams).values())
            for group_streams in groups:
                source = RedisStreamSource(self.redis, group_streams, cfg.redis.group, cfg.redis.consumer,
                                           block_ms=cfg.redis.block_ms, claim_idle_ms=cfg.redis.claim_idle_ms,
                                           max_deliveries=cfg.redis.max_deliveries,
                                           max_meta_bytes=cfg.decode.max_meta_bytes)
                await source.start()
                self.sources.append(source)
        for folder in cfg.sources.folders:
            from inspectd.streams.folder import FolderSource

            self.sources.append(FolderSource(folder.path, product=folder.product, line=folder.line,
                                             after=folder.after, ledger=folder.ledger,
                                             poll_interval_s=folder.poll_interval_s, settle_s=folder.settle_s,
                                             notify=folder.notify, rescan_s=folder.rescan_s))
        for cam in cfg.sources.cameras:
            from inspectd.streams.camera import CameraConfig, CameraSource

            uri: int | str = int(cam.uri) if cam.uri.isdigit() else cam.uri
            camera = CameraSource(CameraConfig(cam.name, uri, cam.product, cam.line, policy=cam.policy,
                                               queue_size=cam.queue_size, loop=cam.loop, reconnect=cam.reconnect,
                                               max_fps=cam.max_fps, open_timeout_s=cam.open_timeout_s,
                                               read_timeout_s=cam.read_timeout_s,
                                               backoff_initial_s=cam.backoff_initial_s,
                                               backoff_max_s=cam.backoff_max_s),
                                  on_drop=lambda n, name=cam.name: self.metrics.camera_dropped(name, n))
            camera.start()
            self.sources.append(camera)

    async def _load_products(self) -> None:
        from inspectd.daemon.products import product_configs

        invalid: dict[str, str] = {}
        for product in product_configs(self.config, invalid):
            try:
                await self.registry.put(product)
            except Exception as exc:  # noqa: BLE001 - a bad product never stops the daemon
                log.error("product %s not loaded: %s", product.id, exc)
        for product_id, error in invalid.items():
            self.registry.record_invalid(product_id, error)

    async def _compile_models(self) -> None:
        """model.compile: the serving products' batch sizes compiled before the daemon says it is ready (a product
        built later compiles on its first batches, logged). A compile that fails stops the start with the reason."""
        if all(b.compiled is None for b in self.backbones.values()):
            return
        entries = [e for e in (self.registry.get(i) for i in self.registry.ids()) if e is not None]
        started = time.perf_counter()
        try:
            shapes = await self.engine.warm_up([(e.detector, e.state) for e in entries],
                                               self.config.batcher.max_batch_size)
        except Exception as exc:
            raise RuntimeError(f"model.compile could not compile the image tower ({type(exc).__name__}: {exc}); "
                               "set model.compile: off") from exc
        log.info("model.compile: %d tower shapes compiled for batch sizes 1-%d in %.1f s", shapes,
                 self.config.batcher.max_batch_size, time.perf_counter() - started)

    def _on_registry_change(self, entry: ProductEntry | None, product_id: str) -> None:
        self.metrics.product_changed(product_id, entry)
        self.review.publish("product", {"id": product_id, "version": entry.version if entry else None})

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT or `request_stop`, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        from inspectd.daemon import notify

        notify.ready()
        watchdog = asyncio.create_task(notify.watchdog_loop(self.healthy))
        try:
            await self._stop.wait()
        finally:
            notify.stopping()
            watchdog.cancel()
            await self.shutdown()

    def healthy(self) -> bool:
        """Alive: starting up (e.g. waiting for Redis: alive, not ready), or every stage task runs and publishing
        has not been going on longer than sinks.publish_stall_s (then systemd's watchdog restarts the daemon)."""
        if not self.started:
            return not self._stop.is_set()
        if not all(not t.done() for t in self._tasks):
            return False
        stalled = self.publisher.stalled_for() if self.publisher is not None else 0.0
        return stalled <= self.config.sinks.publish_stall_s

    def ready(self) -> bool:
        return self.started and self.registry is not None and self.registry.all_ready()

    async def shutdown(self) -> None:
        """Stop reading, finish and publish what is in flight, ack, close; bounded by shutdown_timeout_s."""
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        for side in (self.watcher, self.control):  # no rebuilds while draining
            if side is not None:
                await side.stop()
        # Readers see the stop flag and return after their current read, so entries Redis already
        # delivered are scored, not left pending; one stuck longer than a read should take is cancelled.
        readers = getattr(self, "_reader_tasks", [])
        self._stop.set()
        for task in readers:
            if task not in self._reading:  # waiting for permits: nothing delivered yet, safe to cancel
                task.cancel()
        read_wait = max(0.0, min(self.config.redis.block_ms / 1000.0 + 2.0, deadline - time.monotonic()))
        _, stuck = await asyncio.wait(readers, timeout=read_wait) if readers else (set(), set())
        for task in stuck:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        self._hand_back_parked()
        self.batcher.close()
        while self._in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.left_pending = self._in_flight
        if self._in_flight:
            self.metrics.error("shutdown_left_pending")
            log.warning("shutdown: %d frame(s) still in flight after %.0fs (shutdown_timeout_s); they stay pending "
                        "and will be redelivered; exiting with status 3", self._in_flight,
                        self.config.shutdown_timeout_s)
        for task in [*self._tasks, *self._side_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._side_tasks, return_exceptions=True)
        await self._close_sources(deadline)
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None and not asyncio.iscoroutinefunction(close):
                close()
        await self.review.close()  # ends the console's live streams, so the server closes at once
        if self.http is not None:
            await self.http.cleanup()
        if self.engine:
            self.engine.close(wait=self.left_pending == 0)  # never wait out a forward past the deadline
        if self.registry:
            self.registry.close()
        if self.redis is not None:
            await self.redis.aclose()
        log.info("inspectd stopped after %d frame(s)", self.frames_done)

    async def _close_sources(self, deadline: float) -> None:
        """Close every source at once (a camera's close joins its capture thread), all bounded by the one
        shutdown deadline: stuck cameras cost the limit once, not 5 s each."""
        async def close_one(source: Any) -> None:
            close = getattr(source, "close", None)
            if close is None:
                return
            result = close() if asyncio.iscoroutinefunction(close) else asyncio.to_thread(close)
            await result

        tasks = [asyncio.create_task(close_one(s)) for s in self.sources]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=max(0.1, deadline - time.monotonic()))
        for task in done:
            if task.exception() is not None:
                log.warning("closing a source failed: %s", task.exception())
        if pending:
            log.warning("shutdown: %d source(s) did not close within shutdown_timeout_s; leaving them", len(pending))

    # ------------------------------------------------------------------ stages
    async def _read_loop(self, source: Any) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            await self._permits.acquire()
            granted = 1
            while granted < READ_CHUNK and not self._permits.locked():
                await self._permits.acquire()
                granted += 1
            if self._stop.is_set():
                self._release(granted)
                return
            # In `_reading` from the read until every item is handed on: shutdown waits for such a reader
            # instead of cancelling it with delivered entries in its hands
            self._reading.add(asyncio.current_task())
            try:
                try:
                    items = await source.read(granted)
                except asyncio.CancelledError:
                    self._release(granted)
                    raise
                except Exception as exc:  # noqa: BLE001 - a flaky source backs off, the daemon lives
                    self._release(granted)
                    self.metrics.error("source")
                    delay = backoff.next_delay()
                    log.warning("source %s read failed: %s; retrying in %.2fs", type(source).__name__, exc, delay)
                    self._reading.discard(asyncio.current_task())
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                self._release(granted - len(items))
                if items:
                    await self._dispatch(source, items)
            finally:
                self._reading.discard(asyncio.current_task())
            if not items:
                if getattr(source, "exhausted", False):
                    name = getattr(source, "source", type(source).__name__)
                    error = getattr(source, "last_error", "")  # e.g. a video file that raised mid-way
                    log.info("source %s has ended%s", name, f" (last error: {error})" if error else "")
                    return
                await asyncio.sleep(0.01)  # a source that returns at once must not starve the loop

    async def _dispatch(self, source: Any, items: list[Frame | DeadLetter]) -> None:
        """Frames to the batcher; the read's dead letters to the publisher as one job."""
        self._in_flight += len(items)
        dead: list[DeadLetter] = []
        carriers: list[InFlight] = []
        for item in items:
            if isinstance(item, DeadLetter):  # read, and refused before decoding (the source says why)
                self.metrics.received(item.product, item.line)
                dead.append(self._counted(item))
                carriers.append(InFlight(Frame(item.product, item.line, item.frame_id, 0.0,
                                               entry_id=item.entry_id, ack=item.ack), None))
                continue
            flight = InFlight(item, source)
            self._flights[id(item)] = flight
            self.metrics.received(item.product, item.line)
            await self.batcher.put(flight)
        if dead:
            await self._publish.put(([], dead, carriers))

    def _release(self, n: int) -> None:
        for _ in range(n):
            self._permits.release()

    async def _batch_loop(self) -> None:
        while True:
            batch = await self.batcher.next_batch()
            if not batch:
                await self._ready.put(None)
                return
            formed = time.time()
            to_prepare = [f for f in batch if f.prepared is None]
            prepared = await self.engine.prepare([f.frame for f in to_prepare], self._detector_for)
            dead: list[tuple[InFlight, DeadLetter]] = []
            for flight, outcome in zip(to_prepare, prepared, strict=True):
                if isinstance(outcome, DeadLetter):
                    dead.append((flight, self._counted(outcome)))
                else:
                    outcome.timings["queue_wait"] = max(0.0, formed - flight.frame.received_at)
                    flight.prepared = outcome
            await self._ready.put(([f for f in batch if f.prepared is not None], dead))

    def _detector_for(self, product: str) -> Any:
        entry = self.registry.get(product) if self.registry else None
        return entry.detector if entry else None

    async def _engine_loop(self) -> None:
        cfg = self.config.registry
        while True:
            job = await self._ready.get()
            if job is None:
                await self._publish.put(None)
                return
            flights, dead = job
            scored: list[tuple[InFlight, ProductEntry]] = []
            for flight in flights:
                entry = self.registry.get(flight.frame.product)
                if entry is not None:
                    if flight.prepared.prepared_by != entry.detector.preprocessor:
                        try:  # prepared for no or another detector's input: check its cut too (prepare did the rest)
                            self.engine.check_tiles(entry.detector, flight.prepared.size)
                        except FrameError as exc:
                            dead.append((flight, self._dead(flight.frame, exc.reason, exc.stage, exc.detail)))
                            continue
                    scored.append((flight, entry))
                elif self.registry.status(flight.frame.product) == BUILDING and cfg.on_building == "wait" \
                        and not flight.parked:
                    self._park(flight)
                else:
                    status = self.registry.status(flight.frame.product)
                    reason = Reason.PRODUCT_BUILDING if status == BUILDING else (
                        Reason.PRODUCT_FAILED if status else Reason.UNKNOWN_PRODUCT)
                    detail = self.registry.error(flight.frame.product) or f"product {flight.frame.product!r}"
                    dead.append((flight, self._dead(flight.frame, reason, "product", detail)))
            results: list[Result] = []
            if scored:
                self.metrics.batch(len(scored))
                try:
                    results = self._keep_scores(await self._score(scored), dead)
                except Exception as exc:  # noqa: BLE001 - a detector bug dead-letters its product's frames only
                    if len({id(entry) for _, entry in scored}) == 1:
                        failed = [(scored, exc)]
                    else:  # one product's detector must not take the other products' frames with it
                        log.warning("scoring a batch of %d failed (%s: %s); scoring it again product by product",
                                    len(scored), type(exc).__name__, exc)
                        failed, outcomes = await self._score_by_product(scored)
                        results = self._keep_scores(outcomes, dead)
                    for group, error in failed:
                        log.error("scoring %d frame(s) of product %s failed", len(group), group[0][0].frame.product,
                                  exc_info=error)
                        self.metrics.error("score")
                        for flight, _ in group:
                            dead.append((flight, self._dead(flight.frame, Reason.DETECTOR_ERROR, "score",
                                                            f"{type(error).__name__}: {error}")))
                    failed_flights = {id(flight) for group, _ in failed for flight, _ in group}
                    scored = [pair for pair in scored if id(pair[0]) not in failed_flights]
            flights_out = [f for f, _ in scored] + [f for f, _ in dead if f is not None]  # (None: in scored)
            await self._publish.put((results, [d for _, d in dead], flights_out))

    async def _score(self, scored: list[tuple[InFlight, ProductEntry]]) -> list[Result | DeadLetter]:
        items = [ScoreItem(entry.detector, entry.state, tiles=f.prepared.tiles, layout=f.prepared.layout,
                           map_size=self._map_size(entry, f.prepared.size), prepared_by=f.prepared.prepared_by)
                 for f, entry in scored]
        outputs, batch_timings = await self.engine.score(items, [f.frame for f, _ in scored])
        return [self._result(flight.frame, entry, output, dict(flight.prepared.timings, **batch_timings))
                if math.isfinite(output.score) else self._not_a_score(flight.frame, entry, output.score)
                for (flight, entry), output in zip(scored, outputs, strict=True)]

    def _not_a_score(self, frame: Frame, entry: ProductEntry, score: float) -> DeadLetter:
        """A NaN or infinite score has no verdict (NaN >= threshold is False: it would pass as OK, and poison the
        score histogram's sum): the frame is a detector_error dead letter instead."""
        self.metrics.error("score")
        return self._dead(frame, Reason.DETECTOR_ERROR, "score",
                          f"detector {entry.config.detector!r} (version {entry.version}) gave the score {score}; "
                          "no verdict")

    @staticmethod
    def _keep_scores(outcomes: list[Result | DeadLetter], dead: list[tuple[Any, DeadLetter]]) -> list[Result]:
        """The results of ``outcomes``; its dead letters (frames without a score) join ``dead``."""
        dead += [(None, d) for d in outcomes if isinstance(d, DeadLetter)]
        return [r for r in outcomes if isinstance(r, Result)]

    async def _score_by_product(self, scored: list[tuple[InFlight, ProductEntry]]
                                ) -> tuple[list[tuple[list[tuple[InFlight, ProductEntry]], Exception]],
                                           list[Result | DeadLetter]]:
        """Each product's frames of a failed batch as a batch of their own: (the groups that fail again, with
        their error; the results of the others)."""
        groups: dict[int, list[tuple[InFlight, ProductEntry]]] = {}
        for pair in scored:
            groups.setdefault(id(pair[1]), []).append(pair)
        failed, results = [], []
        for group in groups.values():
            try:
                results += await self._score(group)
            except Exception as exc:  # noqa: BLE001 - this product's frames are dead-lettered
                failed.append((group, exc))
        return failed, results

    def background(self, coro: Any, name: str = "") -> asyncio.Task:
        """Run ``coro`` as a side task of the daemon (cancelled at shutdown)."""
        task = asyncio.create_task(coro, name=name or None)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    def _park(self, flight: InFlight) -> None:
        """Hold a frame of a product that is still building; re-queue when ready or after the timeout."""
        flight.parked = True

        async def wait_then_requeue() -> None:
            await self.registry.wait_ready(flight.frame.product, self.config.registry.wait_timeout_s)
            if self._parked.pop(id(flight), None) is not None:
                await self.batcher.put(flight)

        self._parked[id(flight)] = (flight, self.background(wait_then_requeue()))

    def _hand_back_parked(self) -> None:
        """At shutdown: frames parked for a build that will not finish in this process are left unacked, not
        waited for (it may take minutes, and the build is stopped) nor dead-lettered: their source redelivers
        them (a Redis entry stays pending for a peer or the next start; a folder file stays in the inbox)."""
        parked, self._parked = list(self._parked.values()), {}
        for flight, task in parked:
            task.cancel()
            self._flights.pop(id(flight.frame), None)
        self._in_flight -= len(parked)
        self._release(len(parked))
        self.handed_back = len(parked)
        if parked:
            products = sorted({flight.frame.product for flight, _ in parked})
            log.info("shutdown: %d frame(s) waiting for a build of %s handed back unacked; they will be redelivered",
                     len(parked), ", ".join(products))

    def _map_size(self, entry: ProductEntry, size: tuple[int, int]) -> tuple[int, int] | None:
        return map_size_for(entry.mask_policy.mode, entry.mask_policy.max_side, size)

    def _result(self, frame: Frame, entry: ProductEntry, output: Any, timings: dict[str, float]) -> Result:
        verdict = VERDICT_NG if output.score >= entry.threshold else VERDICT_OK
        has_mask = output.map is not None and entry.mask_policy.mode != "none"
        note = "" if has_mask else ("mask output disabled for this product" if output.map is not None
                                    else f"detector {entry.config.detector!r} produces no anomaly map")
        return Result(product=frame.product, line=frame.line, frame_id=frame.frame_id, captured_at=frame.captured_at,
                      score=output.score, verdict=verdict, threshold=entry.threshold, detector=entry.config.detector,
                      state_version=str(entry.version), mask=output.map if has_mask else None, mask_note=note,
                      entry_id=frame.entry_id, source=frame.source, timings=timings, meta=frame.meta,
                      meta_raw=frame.meta_raw, input_fields=frame.input_fields,
                      demo_weights=entry.detector.backbone.demo_weights,
                      mask_scale=entry.detector.mask_scale(entry.state))

    def _dead(self, frame: Frame, reason: str, stage: str, detail: str) -> DeadLetter:
        return self._counted(DeadLetter.of_frame(frame, reason, stage, detail))

    def _counted(self, dead: DeadLetter) -> DeadLetter:
        """A frame's dead letter, counted and logged once, where it is made."""
        self.metrics.dead_lettered(dead.product, dead.line, dead.reason)
        log.warning("dead letter %s/%s: %s (%s)", dead.product, dead.frame_id, dead.reason, dead.detail)
        return dead

    async def _publish_loop(self) -> None:
        while True:
            job = await self._publish.get()
            if job is None:
                return
            results, dead, flights = job
            started = time.perf_counter()
            results, dead = await self.publisher.publish(results, dead)
            publish_s = time.perf_counter() - started
            await self._ack(flights)
            now = time.time()
            for result in results:
                self.metrics.scored(result, publish_s, now)
            self.review.observe(results, dead, {(f.frame.source, f.frame.entry_id, f.frame.frame_id): f.frame
                                                for f in flights if f.prepared is not None} if self.review.keeping
                                else {})
            self.frames_done += len(flights)
            for flight in flights:
                self._flights.pop(id(flight.frame), None)
            self._in_flight -= len(flights)
            self._release(len(flights))

    async def _ack(self, flights: list[InFlight]) -> None:
        """Ack every frame once, batched per source where the source can (one XACK round trip)."""
        by_source: dict[int, tuple[Any, list[Frame]]] = {}
        for flight in flights:
            by_source.setdefault(id(flight.origin), (flight.origin, []))[1].append(flight.frame)
        for origin, frames in by_source.values():
            ack_many = getattr(origin, "ack_many", None)
            try:
                if ack_many is not None:
                    await ack_many(frames)
                else:
                    for frame in frames:
                        if frame.ack is not None:
                            await frame.ack()
            except Exception as exc:  # noqa: BLE001 - an unacked frame is redelivered, never lost
                self.metrics.error("ack")
                log.warning("ack failed (%s); the frames will be redelivered", exc)

    async def _keep_alive_loop(self) -> None:
        """Frames queued here longer than a fraction of claim_idle_ms are re-claimed to ourselves, so
        another instance's XAUTOCLAIM takes over only frames of an instance that stopped working."""
        interval = max(0.05, self.config.redis.claim_idle_ms / 1000.0 / 4)
        while True:
            await asyncio.sleep(interval)
            by_source: dict[int, tuple[Any, list[Frame]]] = {}
            for flight in list(self._flights.values()):
                by_source.setdefault(id(flight.origin), (flight.origin, []))[1].append(flight.frame)
            for origin, frames in by_source.values():
                keep_alive = getattr(origin, "keep_alive", None)
                if keep_alive is not None:
                    try:
                        await keep_alive(frames)
                    except Exception as exc:  # noqa: BLE001 - at worst another instance scores a duplicate
                        self.metrics.error("keep_alive")
                        log.warning("keep-alive of in-flight entries failed: %s", exc)

    async def _maintenance_loop(self) -> None:
        """Input retention (trim what every group has acked) and removal of long-idle consumers without work."""
        cfg = self.config.redis
        while True:
            await asyncio.sleep(cfg.maintenance_interval_s)
            await self.maintain()

    async def maintain(self) -> None:
        cfg = self.config.redis
        for source in self.sources:
            if not hasattr(source, "trim_acked"):
                continue
            try:
                if cfg.keep_acked_s >= 0:
                    trimmed = await source.trim_acked(cfg.keep_acked_s)
                    if trimmed:
                        log.info("input retention: trimmed %s", trimmed)
                if cfg.idle_consumer_s > 0:
                    await source.remove_idle_consumers(int(cfg.idle_consumer_s * 1000))
            except Exception as exc:  # noqa: BLE001 - maintenance never stops the daemon
                self.metrics.error("maintenance")
                log.warning("stream maintenance failed: %s", exc)

    def cameras_live(self) -> dict[str, bool]:
        """Per camera: delivered a frame within sources.camera_stale_s (readiness), refreshing its metrics."""
        now = time.monotonic()
        live = {}
        for source in self.sources:
            if not hasattr(source, "last_frame_at"):
                continue
            name = source.config.name
            since = now - (source.last_frame_at or self._started_at)
            self.metrics.camera_state(name, source.connected, source.reconnects, source.frames_captured, since,
                                      getattr(source, "capture_errors", 0))  # (a file played to its end: 0)
            if not getattr(source, "finished", False):  # a video file played to its end is done, not down
                live[name] = since <= self.config.sources.camera_stale_s
        return live

    async def _gauge_loop(self) -> None:
        while True:
            self.cameras_live()
            self.metrics.queue_depth("inbox", self.batcher.qsize())
            self.metrics.queue_depth("in_flight", self._in_flight)
            for source in self.sources:
                pending = getattr(source, "pending_count", None)
                if pending is not None:
                    with contextlib.suppress(Exception):
                        self.metrics.redis_pending(",".join(source.streams), await pending())
            await asyncio.sleep(2.0)


def _by_slot(streams: list[str]) -> dict[int, list[str]]:
    """Streams grouped by Redis Cluster hash slot (the ``{line}`` hash tag decides it), in config order."""
    from redis.crc import key_slot

    groups: dict[int, list[str]] = {}
    for stream in streams:
        groups.setdefault(key_slot(stream.encode()), []).append(stream)
    return groups
