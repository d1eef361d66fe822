"""Image codec at the edge: frame payload (encoded, or raw uint8/uint16 pixels in either byte order) -> HxWx3
uint8 RGB, and masks as 8- or 16-bit greyscale PNG (and back, for consumers). Every decode failure is a
``FrameError(stage="decode", reason=...)``."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from inspectd.jpeg_draft import MinSize, draft_jpeg
from inspectd.streams.reasons import Reason
from inspectd.streams.schema import Frame, FrameError

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF"})
# Pillow's name for a JPEG that carries an MPF (multi-picture) second image, as cameras embed a large preview: its
# first picture, the one decoded, is an ordinary JPEG, so it is allowed wherever JPEG is
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
RAW_DTYPES = ("uint8", "uint16")

# Short machine-readable reasons (the dead-letter ``reason`` field).
R_MISSING = Reason.MISSING_IMAGE
R_TOO_LARGE = Reason.TOO_LARGE
R_TOO_MANY_PIXELS = Reason.TOO_MANY_PIXELS
R_TOO_MANY_SCANS = Reason.TOO_MANY_SCANS
R_CORRUPT = Reason.CORRUPT_IMAGE
R_UNSUPPORTED = Reason.UNSUPPORTED_FORMAT
R_BAD_RAW_SHAPE = Reason.BAD_RAW_SHAPE
R_BAD_RAW_DTYPE = Reason.BAD_RAW_DTYPE


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What a frame payload may be: byte size, pixel count and a JPEG's scans (checked before decoding), formats
    ("JPEG" allows Pillow's "MPO" too)."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    # a progressive JPEG's scans each make libjpeg pass over every block again: 2000 cheap repeated scans in a
    # 253 KiB 6000 x 6000 file take a minute to decode; encoders write ~10 (libjpeg's default script: 10 for
    # colour, 6 for grey; a baseline JPEG has 1 per component at most), so 100 leaves a wide margin
    max_jpeg_scans: int = 100
    allowed_formats: frozenset[str] = field(default=DEFAULT_FORMATS)


def _fail(reason: str, detail: str = "") -> FrameError:
    return FrameError(stage="decode", reason=reason, detail=detail)


def decode_frame_image(frame: Frame, limits: DecodeLimits | None = None) -> np.ndarray:
    """The frame's pixels as HxWx3 uint8 RGB (``frame.image`` when a source already decoded it)."""
    return decode_frame_scaled(frame, limits)[0]


def decode_frame_scaled(frame: Frame, limits: DecodeLimits | None = None, min_size: MinSize | None = None
                        ) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels HxWx3 uint8 RGB, the frame's own (H, W)). With ``min_size`` a JPEG is decoded at 1/2, 1/4 or 1/8
    scale where that keeps at least ``min_size(H, W)`` (libjpeg's scaled IDCT: most of the decode's work skipped);
    every other frame in full."""
    limits = limits or DecodeLimits()
    if frame.image is not None:
        image = to_rgb8(frame.image)
    elif not frame.payload:
        raise _fail(R_MISSING, "frame has neither image nor payload")
    elif frame.raw_shape is not None:
        image = decode_raw(frame.payload, frame.raw_shape, frame.raw_dtype or "uint8", limits,
                           byte_order=frame.raw_byte_order)
    else:
        return _decode_bytes(frame.payload, limits, min_size)
    return image, (int(image.shape[0]), int(image.shape[1]))


def decode_image_bytes(data: bytes, limits: DecodeLimits | None = None) -> np.ndarray:
    """Decode PNG/JPEG/BMP/TIFF bytes; the header's declared size is checked before pixels are read."""
    return _decode_bytes(data, limits, None)[0]


def _decode_bytes(data: bytes, limits: DecodeLimits | None, min_size: MinSize | None
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    limits = limits or DecodeLimits()
    if len(data) > limits.max_bytes:
        raise _fail(R_TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: parses the header only
    except Image.DecompressionBombError as exc:
        raise _fail(R_TOO_MANY_PIXELS, str(exc)) from None
    except Exception as exc:  # UnidentifiedImageError, SyntaxError, struct.error, ...
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " (the frame's bytes)", str(exc))
        raise _fail(R_CORRUPT, f"{type(exc).__name__}: {detail}") from None
    with img:
        if img.format not in limits.allowed_formats and not (
                img.format in JPEG_FORMATS and "JPEG" in limits.allowed_formats):
            raise _fail(R_UNSUPPORTED, f"format {img.format!r} not in {sorted(limits.allowed_formats)}")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise _fail(R_CORRUPT, f"declared size {width}x{height}")
        if width * height > limits.max_pixels:
            raise _fail(R_TOO_MANY_PIXELS, f"{width}x{height} > {limits.max_pixels} pixels")
        if img.format in JPEG_FORMATS:
            _check_jpeg_scans(data, limits.max_jpeg_scans)
        try:
            shown = draft_jpeg(img, min_size)
            img.load()
            # a JPEG/TIFF EXIF orientation (phone or tablet uploads) is applied so masks line up with
            # what viewers show; a no-op without the tag
            ImageOps.exif_transpose(img, in_place=True)
            pixels = _pil_to_rgb8(img)
            return pixels, shown or (int(pixels.shape[0]), int(pixels.shape[1]))
        except Image.DecompressionBombError as exc:
            raise _fail(R_TOO_MANY_PIXELS, str(exc)) from None
        except Exception as exc:  # truncated data, bad chunks, decoder errors
            raise _fail(R_CORRUPT, f"{type(exc).__name__}: {exc}") from None


# The next marker as libjpeg's reader finds it: 0xFF (the last of any 0xFF fill bytes) then a code from 0xC0 up.
# Not markers here: 0xFF00 (a 0xFF byte of entropy-coded data, stuffed), RST0-7 0xD0-0xD7 (restart markers inside
# a scan's data, no length), SOI 0xD8 and codes below 0xC0 (TEM, reserved): no length, or an error that stops
# libjpeg before any further scan, so reading on past them can only count more scans, never fewer.
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd9-\xfe]")


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """Start-of-scan (SOS, 0xFFDA) markers in a JPEG's first picture (an MPO's first: the one decoded), counted by
    walking its marker segments as libjpeg reads them, up to EOI or the end of the data; it stops counting once
    over ``stop_after``. A segment's payload (APPn, COM, tables) is skipped by its length, so 0xFF 0xDA bytes in
    EXIF or a comment are not counted; after an SOS header its entropy-coded data runs to the next marker."""
    count, pos = 0, 2  # after SOI
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        code, pos = data[found.start() + 1], found.end()
        if code == 0xD9:  # EOI: libjpeg reads no further (an MPO's next pictures are not decoded)
            break
        if code == 0xDA:
            count += 1
            if stop_after is not None and count > stop_after:
                break
        if pos + 2 > len(data):
            break
        # the segment's length counts its own 2 bytes (libjpeg skips at least those)
        pos += max(int.from_bytes(data[pos:pos + 2], "big"), 2)
    return count


def _check_jpeg_scans(data: bytes, limit: int) -> None:
    """A JPEG/MPO with more than ``limit`` scans is refused before decoding (libjpeg-turbo's ``djpeg -maxscans``)."""
    # the segments are walked rather than ``data.count(b"\xff\xda")`` taken: that is only an upper bound (an APPn
    # or COM payload may hold such pairs; entropy-coded data cannot, its 0xFF bytes are stuffed as 0xFF00), and the
    # walk's regex search is no slower (4 ms for a 12 MiB progressive 12 MP JPEG, the count 11 ms)
    if count_jpeg_scans(data, stop_after=limit) > limit:
        raise _fail(R_TOO_MANY_SCANS, f"more than {limit} scans (start-of-scan markers; decode.max_jpeg_scans)")


def is_raw_shape(shape: tuple[int, ...]) -> bool:
    """True for (H,W) or (H,W,C) with C in 1, 3, 4 and positive sizes."""
    if len(shape) not in (2, 3) or any(s <= 0 for s in shape):
        return False
    return len(shape) == 2 or shape[2] in (1, 3, 4)


def decode_raw(
    data: bytes, shape: tuple[int, ...], dtype: str, limits: DecodeLimits | None = None, *,
    byte_order: str = "little",
) -> np.ndarray:
    """Raw pixel bytes with shape (H,W) or (H,W,1|3|4), row-major, channels interleaved, dtype uint8/uint16
    (``byte_order`` "little" or "big" for uint16) -> HxWx3 uint8 RGB (uint16 reduced by :func:`to_rgb8`)."""
    limits = limits or DecodeLimits()
    if byte_order not in ("little", "big"):
        raise _fail(R_BAD_RAW_DTYPE, f"byte order {byte_order!r} is not 'little' or 'big'")
    if len(data) > limits.max_bytes:
        raise _fail(R_TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}")
    if dtype not in RAW_DTYPES:
        raise _fail(R_BAD_RAW_DTYPE, f"dtype {dtype!r} not in {RAW_DTYPES}")
    shape = tuple(int(s) for s in shape)
    if not is_raw_shape(shape):
        raise _fail(R_BAD_RAW_SHAPE, f"shape {shape} is not (H,W) or (H,W,1|3|4)")
    if shape[0] * shape[1] > limits.max_pixels:
        raise _fail(R_TOO_MANY_PIXELS, f"{shape[1]}x{shape[0]} > {limits.max_pixels} pixels")
    np_dtype = np.dtype(dtype).newbyteorder("<" if byte_order == "little" else ">")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise _fail(R_BAD_RAW_SHAPE, f"{len(data)} bytes, shape {shape} {dtype} needs {expected}")
    return to_rgb8(np.frombuffer(data, dtype=np_dtype).reshape(shape))


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """HxW / HxWx1|3|4 uint8|uint16 -> contiguous HxWx3 uint8 (alpha dropped, gray replicated).

    uint16 is reduced linearly over its full range, ``round(v * 255 / 65535)`` (0 -> 0, 65535 -> 255; no
    windowing): 10/12-bit sensor data must be scaled to the full 16-bit range by its producer."""
    a = np.asarray(array)
    if a.dtype == np.uint16 or a.dtype.kind in "ui" and a.dtype.itemsize > 1:
        a = ((np.clip(a, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise _fail(R_BAD_RAW_DTYPE, f"dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise _fail(R_BAD_RAW_SHAPE, f"array shape {a.shape}")
    return np.ascontiguousarray(a)


def _pil_to_rgb8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale (Pillow may expose it as 32-bit "I"): scale the 0..65535 range to 8 bit.
        return to_rgb8(np.asarray(img).astype(np.int64).clip(0, 65535).astype(np.uint16))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return to_rgb8(np.clip(arr, 0, 255).astype(np.uint8))
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HxW or HxWx3|4 uint8 array (other dtypes go through :func:`to_rgb8` rules)."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        a = to_rgb8(a)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


MASK_BITS = (8, 16)


def mask_to_uint8(mask: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """A float [0,1] HxW map as uint8 0..255, optionally shrunk so its longer side is <= max_side."""
    m = _mask_2d(mask)
    m8 = (np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    size = _shrunk_size(m8.shape, max_side)
    if size is not None:
        m8 = np.asarray(Image.fromarray(m8).resize(size, Image.Resampling.BILINEAR))
    return m8


def mask_to_uint16(mask: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """A float [0,1] HxW map as uint16 0..65535 (shrunk in float first, like :func:`mask_to_uint8`)."""
    m = np.clip(np.nan_to_num(_mask_2d(mask), nan=0.0), 0.0, 1.0)
    size = _shrunk_size(m.shape, max_side)
    if size is not None:
        m = np.clip(np.asarray(Image.fromarray(m).resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    return (m * 65535.0 + 0.5).astype(np.uint16)


def _mask_2d(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {m.shape}")
    return m


def _shrunk_size(shape: tuple[int, ...], max_side: int | None) -> tuple[int, int] | None:
    """(width, height) with the longer side ``max_side``, or None when no shrinking is needed."""
    h, w = shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return None
    scale = max_side / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode_mask_png(mask: np.ndarray, max_side: int | None = None, bits: int = 8) -> bytes:
    """Greyscale PNG of a float [0,1] anomaly map (pixel = map x (2**bits - 1)), 8- or 16-bit, optionally
    downscaled to ``max_side``. 16-bit samples are big-endian in the file, as PNG prescribes."""
    if bits == 8:
        return encode_png(mask_to_uint8(mask, max_side))
    if bits != 16:
        raise ValueError(f"mask bits must be one of {MASK_BITS}, got {bits!r}")
    buf = io.BytesIO()
    Image.fromarray(mask_to_uint16(mask, max_side)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def decode_mask_png(data: bytes) -> tuple[np.ndarray, int]:
    """(HxW float32 map in [0,1], bit depth) of a mask PNG as results carry it (8- or 16-bit greyscale)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.float32) / 65535.0, 16
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, 8
