"""The records that flow through the daemon: Frame in, Result or DeadLetter out.

A Frame travels one way, source -> decoder -> batcher -> engine -> sink; the only way back into a
source is its ``ack`` handle. Sinks write Results and DeadLetters; nothing raises out of the loop.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AckHandle = Callable[[], Awaitable[None]]

VERDICT_OK = "OK"
VERDICT_NG = "NG"

# Field names of the Redis frame message (documented in README "Frame message schema").
F_PRODUCT = "product"
F_LINE = "line"
F_FRAME_ID = "frame_id"
F_CAPTURED_AT = "ts"
F_IMAGE = "image"
F_SHAPE = "shape"
F_DTYPE = "dtype"
F_META = "meta"


@dataclass(slots=True)
class Frame:
    """One image to score, with where it came from and how to acknowledge it."""

    product: str
    line: str
    frame_id: str
    captured_at: float
    payload: bytes | None = None  # encoded image (PNG/JPEG/BMP/TIFF) or raw pixel bytes
    raw_shape: tuple[int, ...] | None = None  # set when payload is raw pixels
    raw_dtype: str | None = None
    image: np.ndarray | None = None  # HxWx3 uint8 RGB once decoded
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # e.g. "redis:inspect:{line1}:frames", "camera:0", "folder:/data/in"
    entry_id: str | None = None  # source position (Redis entry id) for de-duplication
    received_at: float = field(default_factory=time.time)
    ack: AckHandle | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


@dataclass(slots=True)
class Result:
    """The verdict on one frame, as every sink writes it."""

    product: str
    line: str
    frame_id: str
    captured_at: float
    score: float
    verdict: str  # VERDICT_OK | VERDICT_NG
    threshold: float
    detector: str
    state_version: str
    mask: np.ndarray | None = None  # HxW float32 in [0,1], None when the product publishes none
    mask_note: str = ""  # why there is no mask, when there is none
    entry_id: str | None = None
    source: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    demo_weights: bool = False  # True when scored by random (meaningless) weights
    mask_scale: float = 1.0  # the map value a mask pixel of 255 stands for (maps of some detectors exceed 1)


@dataclass(slots=True)
class DeadLetter:
    """A frame that could not be scored, and why."""

    reason: str
    stage: str  # "parse" | "decode" | "product" | "score" | "publish"
    product: str = ""
    line: str = ""
    frame_id: str = ""
    entry_id: str | None = None
    source: str = ""
    detail: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # the original message's small fields
    ack: AckHandle | None = None  # acknowledges the source entry once the dead letter is published


class FrameError(Exception):
    """A frame that cannot be scored; carries the dead-letter stage and reason."""

    def __init__(self, stage: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{stage}: {reason}" + (f" ({detail})" if detail else ""))
        self.stage = stage
        self.reason = reason
        self.detail = detail
