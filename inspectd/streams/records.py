"""Flat, sink-neutral records of Results and DeadLetters (shared by the Redis and JSONL sinks), and the
per-product mask publishing policy ("full" | "downscaled:<max_side>" | "none")."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inspectd.streams.codec import MASK_BITS, encode_mask_png
from inspectd.streams.schema import DeadLetter, Result

MASK_FULL = "full"
MASK_DOWNSCALED = "downscaled"
MASK_NONE = "none"


@dataclass(frozen=True, slots=True)
class MaskPolicy:
    """How a product's anomaly mask is published: in full, downscaled to ``max_side``, or not at all."""

    mode: str = MASK_DOWNSCALED
    max_side: int | None = 256

    @classmethod
    def parse(cls, text: str) -> MaskPolicy:
        """``"full"``, ``"none"`` or ``"downscaled:<max_side>"`` (``"downscaled"`` alone means 256)."""
        mode, _, arg = text.strip().lower().partition(":")
        if mode == MASK_FULL and not arg:
            return cls(MASK_FULL, None)
        if mode == MASK_NONE and not arg:
            return cls(MASK_NONE, None)
        if mode == MASK_DOWNSCALED:
            try:
                side = int(arg) if arg else 256
            except ValueError:
                side = 0
            if side > 0:
                return cls(MASK_DOWNSCALED, side)
        raise ValueError(f"bad mask policy {text!r}: expected full | none | downscaled:<max_side>")

    def __str__(self) -> str:
        return f"{self.mode}:{self.max_side}" if self.mode == MASK_DOWNSCALED else self.mode


MaskPolicies = Mapping[str, MaskPolicy] | Callable[[str], "MaskPolicy | None"] | None


def policy_for(policies: MaskPolicies, product: str, default: MaskPolicy) -> MaskPolicy:
    """The product's mask policy from a mapping or a callable, else ``default``."""
    if callable(policies):
        found = policies(product)
    elif policies is not None:
        found = policies.get(product)
    else:
        found = None
    return found or default


def encode_result_mask(result: Result, policy: MaskPolicy, bits: int = 8) -> tuple[bytes | None, str]:
    """(PNG bytes or None, mask note) for a result under a policy; ``bits`` 8 or 16 per pixel."""
    if result.mask is None:
        return None, result.mask_note
    if policy.mode == MASK_NONE:
        return None, result.mask_note or "mask not published (product policy: none)"
    mask = np.asarray(result.mask) / (result.mask_scale or 1.0)  # full scale = mask_scale on the detector's map
    max_side = policy.max_side if policy.mode == MASK_DOWNSCALED else None
    png = encode_mask_png(mask, max_side, bits)
    note = result.mask_note
    if max_side is not None and max(mask.shape[:2]) > max_side:
        note = note or f"downscaled from {mask.shape[1]}x{mask.shape[0]} to max side {max_side}"
    return png, note


def mask_threshold(result: Result, bits: int = 8) -> float:
    """The threshold on the mask's pixel scale: the pixel value where the map reaches the product's threshold
    (``threshold / mask_scale x (2**bits - 1)``; above the maximum pixel value when no map value can reach it)."""
    return float(result.threshold) / float(result.mask_scale or 1.0) * float((1 << bits) - 1)


def check_mask_bits(bits: int) -> int:
    """``bits`` when it is a mask bit depth the sinks write (8 or 16), else ValueError."""
    if isinstance(bits, bool) or bits not in MASK_BITS:
        raise ValueError(f"mask bits must be one of {list(MASK_BITS)}, got {bits!r}")
    return int(bits)


def result_record(result: Result, mask_bits: int = 8) -> dict[str, Any]:
    """The result's fields as JSON-ready values (no mask); ``mask_bits`` is the depth its mask is written in."""
    return {
        "product": result.product,
        "line": result.line,
        "frame_id": result.frame_id,
        "entry_id": result.entry_id or "",
        "ts": result.captured_at,
        "score": float(result.score),
        "verdict": result.verdict,
        "threshold": float(result.threshold),
        "detector": result.detector,
        "state_version": result.state_version,
        "timings": {k: float(v) for k, v in result.timings.items()},
        "mask_note": result.mask_note,
        "demo_weights": bool(result.demo_weights),
        "mask_scale": float(result.mask_scale),
        "mask_bits": int(mask_bits),
        "mask_threshold": mask_threshold(result, mask_bits),
        "source": result.source,
        "meta": result.meta,
    }


def dead_letter_record(dead: DeadLetter, field_limit: int = 512) -> dict[str, Any]:
    """The dead letter's fields as JSON-ready values; original fields cut to ``field_limit`` chars."""
    return {
        "reason": dead.reason,
        "stage": dead.stage,
        "product": dead.product,
        "line": dead.line,
        "frame_id": dead.frame_id,
        "entry_id": dead.entry_id or "",
        "source": dead.source,
        "detail": dead.detail[: field_limit * 4],
        "fields": {str(k)[:128]: str(v)[:field_limit] for k, v in dead.fields.items()},
    }


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(text: str) -> str:
    """A file-name-safe, readable version of an id (frame ids, products), at most 120 characters."""
    return _UNSAFE_NAME.sub("_", text).strip("._")[:120] or "x"
