"""The records that flow through the daemon: Frame in, Result or DeadLetter out.

A Frame travels one way, source -> decoder -> batcher -> engine -> sink; the only way back into a
source is its ``ack`` handle. Sinks write Results and DeadLetters; nothing raises out of the loop.
"""

from __future__ import annotations

import json
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
F_BYTE_ORDER = "byte_order"
BYTE_ORDERS = ("little", "big")  # of raw uint16 pixels; little is the default


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
    raw_byte_order: str = "little"  # of raw uint16 pixels: "little" | "big"
    image: np.ndarray | None = None  # HxWx3 uint8 RGB once decoded
    meta: dict[str, Any] = field(default_factory=dict)
    meta_raw: bytes | None = None  # the `meta` field exactly as sent (results return it byte for byte)
    input_fields: dict[str, str] = field(default_factory=dict)  # the message's small fields, for dead letters
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
    meta_raw: bytes | None = None  # the frame's `meta` field as sent; None: none sent (or not from a stream)
    input_fields: dict[str, str] = field(default_factory=dict)  # the frame's small fields (an unpublishable
    #                                                             result's dead letter carries them)
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

    @classmethod
    def of_frame(cls, frame: Frame, reason: str, stage: str, detail: str = "") -> DeadLetter:
        """The dead letter of a parsed frame refused at a later stage (decode, product, score): it keeps the
        frame's ids, its ack and its original small fields (``ts``, ``meta``, ...; never the image)."""
        return cls(reason=reason, stage=stage, product=frame.product, line=frame.line, frame_id=frame.frame_id,
                   entry_id=frame.entry_id, source=frame.source, detail=detail,
                   fields=dict(frame.input_fields) or describe_frame(frame), ack=frame.ack)


def describe_frame(frame: Frame) -> dict[str, str]:
    """Wire-style small fields of a frame that did not come as a stream message (a camera, a folder)."""
    fields = {F_PRODUCT: frame.product, F_LINE: frame.line, F_FRAME_ID: frame.frame_id,
              F_CAPTURED_AT: repr(float(frame.captured_at))}
    if frame.meta_raw is not None or frame.meta:
        fields[F_META] = (frame.meta_raw.decode("utf-8", errors="replace") if frame.meta_raw is not None
                          else json.dumps(frame.meta, separators=(",", ":"), default=str))
    return fields


class FrameError(Exception):
    """A frame that cannot be scored; carries the dead-letter stage and reason."""

    def __init__(self, stage: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{stage}: {reason}" + (f" ({detail})" if detail else ""))
        self.stage = stage
        self.reason = reason
        self.detail = detail
