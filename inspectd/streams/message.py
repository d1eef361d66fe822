"""The frame message as Redis stream fields: build it (``frame_fields``) and parse it back into a Frame,
or into a DeadLetter when a field is missing or malformed (``parse_frame_fields``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from inspectd.streams.codec import RAW_DTYPES, is_raw_shape
from inspectd.streams.reasons import Reason
from inspectd.streams.redis_keys import validate_line
from inspectd.streams.schema import (
    BYTE_ORDERS,
    F_BYTE_ORDER,
    F_CAPTURED_AT,
    F_DTYPE,
    F_FRAME_ID,
    F_IMAGE,
    F_LINE,
    F_META,
    F_PRODUCT,
    F_SHAPE,
    DeadLetter,
    Frame,
)

REQUIRED_FIELDS = (F_PRODUCT, F_IMAGE)
SMALL_FIELD_LIMIT = 512  # bytes of each non-image field copied into a dead letter
MAX_META_BYTES = 64 * 1024  # default bound of the `meta` field (copied into every result)


def frame_fields(
    product: str,
    line: str,
    frame_id: str,
    image: bytes,
    *,
    captured_at: float | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: str | None = None,
    byte_order: str | None = None,
    meta: Mapping[str, Any] | str | bytes | None = None,
) -> dict[str, bytes | str]:
    """XADD fields for one frame; ``shape``/``dtype`` (and ``byte_order`` for uint16) mark ``image`` as raw
    pixels. ``meta`` as a mapping is written as compact JSON; as text or bytes it is sent exactly as given."""
    fields: dict[str, bytes | str] = {
        F_PRODUCT: product,
        F_LINE: line,
        F_FRAME_ID: frame_id,
        F_CAPTURED_AT: repr(float(time.time() if captured_at is None else captured_at)),
        F_IMAGE: image,
    }
    if shape is not None:
        fields[F_SHAPE] = ",".join(str(int(s)) for s in shape)
        fields[F_DTYPE] = dtype or "uint8"
        if byte_order is not None:
            fields[F_BYTE_ORDER] = byte_order
    if isinstance(meta, str | bytes):
        fields[F_META] = meta
    elif meta:
        fields[F_META] = json.dumps(dict(meta), separators=(",", ":"))
    return fields


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def small_fields(fields: Mapping[bytes | str, bytes | str], limit: int = SMALL_FIELD_LIMIT) -> dict[str, str]:
    """The message's fields except the image, as text cut to ``limit`` characters (for dead letters)."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        name = _text(key)
        if name == F_IMAGE:
            out["image_bytes"] = str(len(value))
            continue
        out[name] = _text(value[: limit + 1] if isinstance(value, bytes) else value)[:limit]
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    """``"H,W"``, ``"H,W,C"``, ``"HxWxC"`` or JSON ``[H, W, C]`` -> a tuple; ValueError when malformed."""
    text = text.strip()
    try:
        parts = json.loads(text) if text.startswith("[") else text.replace("x", ",").split(",")
        if not isinstance(parts, list):
            raise ValueError("shape is not a list")
        if any(isinstance(p, bool) or not isinstance(p, (int, str)) for p in parts):  # int(4.9) would be 4
            raise ValueError("shape is not a list of integers")
        shape = tuple(int(p) for p in parts)
    except (OverflowError, RecursionError) as exc:  # "[1e999,3]" (int(inf)), "[[[[...": malformed all the same
        raise ValueError(f"shape is not a list of integers ({type(exc).__name__})") from None
    if not is_raw_shape(shape):
        raise ValueError(f"shape {shape} is not (H,W) or (H,W,1|3|4)")
    return shape


def entry_time(entry_id: str) -> float:
    """Seconds since the epoch encoded in a Redis entry id ("<ms>-<seq>"); now when unparsable."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return time.time()


def parse_frame_fields(
    fields: Mapping[bytes | str, bytes | str] | None,
    *,
    entry_id: str,
    source: str,
    default_line: str = "",
    max_meta_bytes: int = MAX_META_BYTES,
) -> Frame | DeadLetter:
    """A Frame from one stream entry, or a DeadLetter(stage="parse") naming what is wrong.

    Required: product, image. ``frame_id`` defaults to the entry id, ``ts`` to the entry id's time. The Frame
    keeps ``meta`` exactly as sent (``meta_raw``) and the message's small fields (``input_fields``), so a later
    stage's dead letter still carries them.
    The line rule: a frame belongs to the line of the stream it was read from (``default_line``), so its
    result can only go to that line's results stream; a ``line`` field naming another line, or no valid
    line id at all, is a ``bad_line`` dead letter on the stream's own line.
    """
    raw = {_text(k): v for k, v in (fields or {}).items()}
    claimed = _text(raw.get(F_LINE, b""))[:SMALL_FIELD_LIMIT]
    base = {
        "product": _text(raw.get(F_PRODUCT, b""))[:SMALL_FIELD_LIMIT],
        "line": default_line or claimed,
        "frame_id": _text(raw.get(F_FRAME_ID, b""))[:SMALL_FIELD_LIMIT] or entry_id,
    }

    input_fields = small_fields(raw)

    def dead(reason: str, detail: str) -> DeadLetter:
        return DeadLetter(reason=reason, stage="parse", entry_id=entry_id, source=source, detail=detail,
                          fields=input_fields, **base)

    line_problem = _line_problem(claimed, default_line)
    if line_problem:
        if not default_line:
            base["line"] = ""  # no valid line to name: the dead-letter sink's default stream takes it
        return dead(Reason.BAD_LINE, line_problem)
    missing = [name for name in REQUIRED_FIELDS if not raw.get(name)]
    if missing:
        return dead(Reason.MISSING_FIELD, "missing or empty: " + ",".join(missing))
    image = raw[F_IMAGE]
    payload = image if isinstance(image, bytes) else image.encode("latin-1")

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    if raw.get(F_SHAPE):
        try:
            shape = parse_shape(_text(raw[F_SHAPE]))
        except (ValueError, TypeError) as exc:
            return dead(Reason.BAD_SHAPE, f"{_text(raw[F_SHAPE])[:80]!r}: {exc}")
        dtype = _text(raw.get(F_DTYPE, b"uint8")) or "uint8"
        if dtype not in RAW_DTYPES:
            return dead(Reason.BAD_DTYPE, f"dtype {dtype[:40]!r} not uint8/uint16")
    byte_order = _text(raw.get(F_BYTE_ORDER, b"")) or "little"
    if byte_order not in BYTE_ORDERS:
        return dead(Reason.BAD_BYTE_ORDER, f"byte_order {byte_order[:40]!r} is not 'little' or 'big'")

    if raw.get(F_CAPTURED_AT):
        text = _text(raw[F_CAPTURED_AT])
        try:
            captured_at = float(text)
        except ValueError:
            return dead(Reason.BAD_TS, f"ts {text[:40]!r} is not a number")
        if not math.isfinite(captured_at):
            return dead(Reason.BAD_TS, f"ts {text[:40]!r} is not a finite number")
    else:
        captured_at = entry_time(entry_id)

    meta: dict[str, Any] = {}
    meta_raw: bytes | None = None
    if raw.get(F_META):
        value = raw[F_META]
        meta_raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if len(meta_raw) > max_meta_bytes:
            return dead(Reason.META_TOO_LARGE,
                        f"meta is {len(meta_raw)} bytes > {max_meta_bytes} (decode.max_meta_bytes)")
        try:
            meta = json.loads(meta_raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return dead(Reason.BAD_META, f"meta is not UTF-8: {exc}")
        except ValueError as exc:
            return dead(Reason.BAD_META, f"meta is not JSON: {exc}")
        except RecursionError:  # deeper nesting than the JSON parser takes (well under max_meta_bytes)
            return dead(Reason.BAD_META, "meta is nested too deeply to parse")
        if not isinstance(meta, dict):
            return dead(Reason.BAD_META, "meta is not a JSON object")

    return Frame(captured_at=captured_at, payload=payload, raw_shape=shape, raw_dtype=dtype,
                 raw_byte_order=byte_order, meta=meta, meta_raw=meta_raw, input_fields=input_fields,
                 source=source, entry_id=entry_id, **base)


def _line_problem(claimed: str, stream_line: str) -> str:
    """Why a frame's line is unacceptable ("" when it is fine): see `parse_frame_fields`' line rule."""
    line = claimed or stream_line
    if not line:
        return ""  # not from a stream and no line given: the sinks' default line
    try:
        validate_line(line)
    except ValueError as exc:
        return str(exc)
    if stream_line and claimed and claimed != stream_line:
        return (f"line field {claimed!r} differs from the line {stream_line!r} of the stream it was read from "
                "(a frame's result goes to its own stream's line only)")
    return ""
