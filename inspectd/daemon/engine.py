"""Scoring engine: one worker thread runs the detector forwards; a decode pool prepares input.

The event loop never blocks on torch: `prepare` (decode, then the product's own pre-processing:
its detector chooses tiling or a square resize at its size) runs in the decode pool, so the next
batch is prepared while `score` runs the current one on the engine thread. A frame whose product was
not serving at prepare time, or whose detector's input changed in a hot swap, is pre-processed
again from its encoded bytes on the engine thread; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inspectd.detectors import cpu_threads
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest
from inspectd.detectors.base import Detector, ProductState
from inspectd.detectors.pipeline import ScoreItem, ScoreOutput, run
from inspectd.detectors.preprocess import Preprocessor, TileLayout
from inspectd.streams.codec import DecodeLimits, decode_frame_scaled
from inspectd.streams.reasons import Reason
from inspectd.streams.schema import DeadLetter, Frame, FrameError

log = logging.getLogger(__name__)

MAX_AUTO_DECODE_THREADS = 16


def auto_decode_threads(devices: Sequence[torch.device], cores: int | None = None) -> int:
    """`decode.threads: -1`: 0 when every model runs on the CPU (decode on the engine thread between forwards:
    torch already uses every core); with a GPU, every core this process may use (`usable_cores`) but the event
    loop's and the engine thread's, 2 to 16. A 1080p frame costs ~21 ms of one core to decode and resize to 240 px
    (the report's frame-size sweep): a fixed pair of threads would hold a GPU that scores hundreds of frames a
    second to ~90."""
    if all(device.type == "cpu" for device in devices):
        return 0
    return max(2, min(MAX_AUTO_DECODE_THREADS, (usable_cores() if cores is None else cores) - 2))


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container limited
    to 4 CPUs on a 64-core node sees 64 in its affinity)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs of the cgroup's quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when
    there is none or it cannot be read."""
    try:
        if (cgroup / "cpu.max").is_file():
            quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def _single_threaded_worker() -> None:
    """Decode-pool initializer: an exception here would break the pool (every later decode would fail)."""
    try:
        if not cpu_threads.single_threaded():
            log.debug("decode worker keeps torch's thread count (its OpenMP runtime is not reachable)")
    except Exception:  # noqa: BLE001 - a slower worker, not a dead pool
        log.exception("decode worker: setting one torch thread failed; it keeps torch's count")


@dataclass
class PreparedFrame:
    """A decoded frame, pre-processed for its product's detector when that was known."""

    frame: Frame
    size: tuple[int, int]
    tiles: torch.Tensor | None = None
    layout: TileLayout | None = None
    prepared_by: Preprocessor | None = None
    timings: dict[str, float] = field(default_factory=dict)


class ScoringEngine:
    """Owns the worker thread the forwards run on and the decode pool."""

    def __init__(self, devices: Sequence[torch.device], decode_threads: int = 2,
                 limits: DecodeLimits | None = None, max_tiles: int = 16, keep_payload: bool = False) -> None:
        self.devices = sorted(set(devices), key=str)
        # the console keeps frames for review: their bytes live past scoring, and the frames it renders (at most
        # console.ng_per_s + ok_per_s a second) are decoded again then; cheaper than a review-size copy of every
        # frame while frames come faster than that, which is when the CPU is short
        self.keep_payload = keep_payload
        self.limits = limits or DecodeLimits()
        self.max_tiles = max_tiles
        name = "+".join(str(d) for d in self.devices)
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inspectd-engine-{name}")
        # decode_threads = 0: decode on the engine thread, in turn with the forwards (no overlap, no contention:
        # better when torch already uses every core); a pool's workers run their torch ops on one thread each
        self._decode = self._engine if decode_threads == 0 else ThreadPoolExecutor(
            max_workers=decode_threads, thread_name_prefix="inspectd-decode", initializer=_single_threaded_worker)

    def _prepare_one(self, frame: Frame, detector: Detector | None) -> PreparedFrame | DeadLetter:
        started = time.perf_counter()
        try:
            image, size = decode_frame_scaled(frame, self.limits,
                                              None if detector is None else detector.preprocessor.decode_size)
            decoded = time.perf_counter()
            prepared = PreparedFrame(frame, size)
            if detector is not None:
                self.check_tiles(detector, size)
                prepared.tiles, prepared.layout = detector.preprocessor(image, original=size)
                prepared.prepared_by = detector.preprocessor
        except FrameError as exc:  # the dead letter keeps the frame's original small fields (ts, meta, ...)
            return DeadLetter.of_frame(frame, exc.reason, exc.stage, exc.detail)
        except Exception as exc:  # noqa: BLE001 - any decoder bug becomes a dead letter, not a crash
            return DeadLetter.of_frame(frame, Reason.DECODE_ERROR, "decode", f"{type(exc).__name__}: {exc}")
        prepared.timings = {"decode": decoded - started, "preprocess": time.perf_counter() - decoded}
        return prepared

    def tiles_needed(self, detector: Detector, size: tuple[int, int]) -> int:
        return detector.preprocessor.layout(*size).n_tiles

    def check_tiles(self, detector: Detector, size: tuple[int, int]) -> None:
        """Refuse a frame whose shape needs more model inputs than ``max_tiles`` (checked from the size alone,
        before any resize: a 10000 x 10 strip would otherwise become a 240 x 240000 image of 500 tiles)."""
        needed = self.tiles_needed(detector, size)
        if needed > self.max_tiles:
            raise FrameError("decode", Reason.TOO_MANY_TILES,
                             f"{size[1]}x{size[0]} needs {needed} inputs of {detector.preprocessor.size} px "
                             f"> decode.max_tiles {self.max_tiles}")

    async def prepare(self, frames: list[Frame], detector_for: Callable[[str], Detector | None] | None = None
                      ) -> list[PreparedFrame | DeadLetter]:
        """Decode and pre-process ``frames``; ``detector_for(product)`` says whose input each one needs."""
        loop = asyncio.get_running_loop()
        lookup = detector_for or (lambda _product: None)
        jobs = [(f, lookup(f.product)) for f in frames]
        if self._decode is self._engine:  # decoded in turn on the engine thread: one hand-over for the whole batch
            return await loop.run_in_executor(self._engine, lambda: [self._prepare_one(*job) for job in jobs])
        return list(await asyncio.gather(*(loop.run_in_executor(self._decode, self._prepare_one, *job)
                                           for job in jobs)))

    async def score(self, items: list[ScoreItem], frames: Sequence[Frame] | None = None
                    ) -> tuple[list[ScoreOutput], dict[str, float]]:
        """Run one mixed batch on the engine thread; (outputs, {"forward": s, "score": s}).

        An item without tiles for its detector's input is decoded again from ``frames[i]`` first.
        """
        loop = asyncio.get_running_loop()

        def work() -> tuple[list[ScoreOutput], dict[str, float]]:
            timings: dict[str, float] = {}
            for i, item in enumerate(items):
                preprocessor = item.detector.preprocessor
                if item.tiles is None or item.prepared_by != preprocessor:
                    if frames is None:
                        raise ValueError("an item needs pre-processing but its frame was not given")
                    image, size = decode_frame_scaled(frames[i], self.limits, preprocessor.decode_size)
                    item.tiles, item.layout = preprocessor(image, original=size)
                    item.prepared_by = preprocessor
            outputs = run(items, timings)
            for device in self.devices:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            for frame in () if self.keep_payload else frames or ():
                frame.payload = None  # scored: the encoded bytes are no longer needed
            return outputs, timings

        return await loop.run_in_executor(self._engine, work)

    async def warm_up(self, products: Sequence[tuple[Detector, ProductState]], max_frames: int) -> int:
        """model.compile: compile the tower now, on the engine thread, for the products' merged feature requests
        per (model, input size) and every batch a batch of ``max_frames`` frames can make (each frame up to
        `max_tiles` tiles, each with its test-time crops), so no frame waits for a compile; the shapes run.
        Nothing for models that are not compiled."""
        crops = max((detector.test_time_crops for detector, _ in products), default=0)
        max_rows = max_frames * self.max_tiles * (1 + crops)
        groups: dict[tuple[int, int], tuple[ClipBackbone, FeatureRequest, int]] = {}
        for detector, state in products:
            backbone, request = detector.backbone, detector.feature_request(state)
            if backbone.compiled is None or request.tower != "plain":
                continue
            size = detector.input_spec().size
            _, merged, _ = groups.get((id(backbone), size), (backbone, request, size))
            groups[(id(backbone), size)] = (backbone, merged | request, size)
        loop = asyncio.get_running_loop()
        compiled = 0
        for backbone, request, size in groups.values():
            compiled += await loop.run_in_executor(self._engine, backbone.warm_up, request, size, max_rows)
        return compiled

    def close(self, wait: bool = True) -> None:
        """Stop the threads; ``wait=False`` leaves a running forward behind (the process exits without it)."""
        self._engine.shutdown(wait=wait, cancel_futures=not wait)
        self._decode.shutdown(wait=wait, cancel_futures=not wait)

    @property
    def busy(self) -> bool:
        return any(t.is_alive() for t in getattr(self._engine, "_threads", ()))


def map_size_for(policy_mode: str, max_side: int | None, size: tuple[int, int]) -> tuple[int, int] | None:
    """The anomaly-map size worth computing for a mask policy (small when it is downscaled anyway)."""
    if policy_mode == "downscaled" and max_side and max(size) > max_side:
        scale = max_side / max(size)
        return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    if policy_mode == "none":
        return (1, 1)
    return None
