"""Scoring engine: one worker thread per device runs the detector forwards; a decode pool prepares input.

The event loop never blocks on torch: `prepare` (decode + resize/tile) runs in the decode pool, so the
next batch is prepared while `score` runs the current one on the engine thread.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.pipeline import ScoreItem, ScoreOutput, run
from inspectd.detectors.preprocess import TileLayout
from inspectd.streams.codec import DecodeLimits, decode_frame_image
from inspectd.streams.schema import DeadLetter, Frame, FrameError


@dataclass
class PreparedFrame:
    """A decoded, tiled frame waiting for the engine."""

    frame: Frame
    tiles: torch.Tensor
    layout: TileLayout
    size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)


class ScoringEngine:
    """Owns the backbone's worker thread and the decode pool."""

    def __init__(self, backbone: ClipBackbone, decode_threads: int = 2, limits: DecodeLimits | None = None) -> None:
        self.backbone = backbone
        self.limits = limits or DecodeLimits()
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inspectd-engine-{backbone.device}")
        # decode_threads = 0: decode on the engine thread, in turn with the forwards (no overlap, no contention:
        # better when torch already uses every core)
        self._decode = self._engine if decode_threads == 0 else ThreadPoolExecutor(
            max_workers=decode_threads, thread_name_prefix="inspectd-decode")

    def _prepare_one(self, frame: Frame) -> PreparedFrame | DeadLetter:
        started = time.perf_counter()
        try:
            image = decode_frame_image(frame, self.limits)
            decoded = time.perf_counter()
            tiles, layout = self.backbone.preprocessor(image)
        except FrameError as exc:
            return DeadLetter(reason=exc.reason, stage=exc.stage, product=frame.product, line=frame.line,
                              frame_id=frame.frame_id, entry_id=frame.entry_id, source=frame.source,
                              detail=exc.detail, ack=frame.ack)
        except Exception as exc:  # noqa: BLE001 - any decoder bug becomes a dead letter, not a crash
            return DeadLetter(reason="decode_error", stage="decode", product=frame.product, line=frame.line,
                              frame_id=frame.frame_id, entry_id=frame.entry_id, source=frame.source,
                              detail=f"{type(exc).__name__}: {exc}", ack=frame.ack)
        frame.payload = None  # the pixels now live in the tiles; free the encoded bytes early
        timings = {"decode": decoded - started, "preprocess": time.perf_counter() - decoded}
        return PreparedFrame(frame, tiles, layout, (int(image.shape[0]), int(image.shape[1])), timings)

    async def prepare(self, frames: list[Frame]) -> list[PreparedFrame | DeadLetter]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._decode, self._prepare_one, f) for f in frames)))

    async def score(self, items: list[ScoreItem]) -> tuple[list[ScoreOutput], dict[str, float]]:
        """Run one mixed batch on the engine thread; (outputs, {"forward": s, "score": s})."""
        loop = asyncio.get_running_loop()

        def work() -> tuple[list[ScoreOutput], dict[str, float]]:
            timings: dict[str, float] = {}
            outputs = run(self.backbone, items, timings)
            if self.backbone.device.type == "cuda":
                torch.cuda.synchronize(self.backbone.device)
            return outputs, timings

        return await loop.run_in_executor(self._engine, work)

    def close(self) -> None:
        self._engine.shutdown(wait=True)
        self._decode.shutdown(wait=True)


def map_size_for(policy_mode: str, max_side: int | None, size: tuple[int, int]) -> tuple[int, int] | None:
    """The anomaly-map size worth computing for a mask policy (small when it is downscaled anyway)."""
    if policy_mode == "downscaled" and max_side and max(size) > max_side:
        scale = max_side / max(size)
        return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    if policy_mode == "none":
        return (1, 1)
    return None
