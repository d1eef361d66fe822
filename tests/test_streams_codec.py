"""Image codec: real dataset images, every format, raw pixels, and the ways a payload is refused."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.streams.codec import (
    DecodeLimits,
    decode_frame_image,
    decode_image_bytes,
    decode_raw,
    encode_mask_png,
    encode_png,
    to_rgb8,
)
from inspectd.streams.redis_keys import StreamKeys, dead_key, frames_key, parse_key, results_key
from inspectd.streams.schema import Frame, FrameError

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
GRID_BENT = DATASETS / "mvtec_ad" / "grid" / "test" / "bent" / "000.png"
HAZELNUT = DATASETS / "hazelnut_toy" / "hazelnut" / "good" / "01.png"


def _frame(payload: bytes, **kw: object) -> Frame:
    return Frame(product="p", line="l", frame_id="f", captured_at=0.0, payload=payload, **kw)


def _encoded(arr: np.ndarray, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_grayscale_dataset_png_becomes_rgb() -> None:
    data = GRID_BENT.read_bytes()
    out = decode_frame_image(_frame(data), DecodeLimits())
    gray = np.asarray(Image.open(GRID_BENT))
    assert gray.ndim == 2
    assert out.shape == (*gray.shape, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgb_dataset_png_decodes_exactly() -> None:
    out = decode_frame_image(_frame(HAZELNUT.read_bytes()))
    np.testing.assert_array_equal(out, np.asarray(Image.open(HAZELNUT).convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    arr = _rgb()
    np.testing.assert_array_equal(decode_image_bytes(_encoded(arr, fmt)), arr)


def test_jpeg_round_trip_is_close() -> None:
    arr = np.full((32, 32, 3), (200, 40, 90), dtype=np.uint8)
    out = decode_image_bytes(_encoded(arr, "JPEG", quality=95))
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr.astype(int)).max() <= 4


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    """A phone-style upload stored landscape with "rotate 90 CW to view" (orientation 6) decodes upright."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :10] = (250, 250, 250)  # bright band at the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image_bytes(_encoded(stored, fmt, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)  # portrait, as viewers show it
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the left band is now at the top
    plain = decode_image_bytes(_encoded(stored, fmt))
    assert plain.shape == (20, 40, 3)


def test_rgba_palette_and_16bit_become_rgb8() -> None:
    rgba = np.dstack([_rgb(), np.full((24, 32), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image_bytes(_encoded(rgba, "PNG")), rgba[:, :, :3])

    pal = Image.fromarray(_rgb()).quantize(colors=8)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image_bytes(buf.getvalue()), np.asarray(pal.convert("RGB")))

    g16 = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")
    out = decode_image_bytes(buf.getvalue())
    np.testing.assert_array_equal(out[:, :, 0], [[0, 255], [100, 200]])


def test_unsupported_format_is_refused() -> None:
    data = _encoded(_rgb(), "GIF")
    with pytest.raises(FrameError) as err:
        decode_image_bytes(data)
    assert (err.value.stage, err.value.reason) == ("decode", "unsupported_format")
    limits = DecodeLimits(allowed_formats=frozenset({"PNG"}))
    with pytest.raises(FrameError, match="unsupported_format"):
        decode_image_bytes(_encoded(_rgb(), "BMP"), limits)


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(FrameError) as err:
        decode_image_bytes(data)
    assert err.value.reason == "corrupt_image"


def test_truncated_png_is_corrupt() -> None:
    data = HAZELNUT.read_bytes()
    with pytest.raises(FrameError) as err:
        decode_image_bytes(data[: len(data) // 2])
    assert err.value.reason == "corrupt_image"


def test_png_bomb_rejected_by_declared_size_before_decoding() -> None:
    # A valid PNG header declaring 30000x30000 8-bit RGB with a tiny (never decoded) IDAT.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))
    with pytest.raises(FrameError) as err:
        decode_image_bytes(data, DecodeLimits(max_pixels=4_000_000))
    assert err.value.reason == "too_many_pixels"
    # Also below Pillow's own bomb threshold: our limit decides, from the header alone.
    ihdr = struct.pack(">IIBBBBB", 3000, 3000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    with pytest.raises(FrameError, match="too_many_pixels"):
        decode_image_bytes(data, DecodeLimits(max_pixels=1_000_000))
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the global default is left alone


def test_oversized_bytes_refused() -> None:
    data = HAZELNUT.read_bytes()
    with pytest.raises(FrameError) as err:
        decode_image_bytes(data, DecodeLimits(max_bytes=len(data) - 1))
    assert err.value.reason == "too_large"
    with pytest.raises(FrameError, match="too_large"):
        decode_raw(b"\0" * 300, (10, 10, 3), "uint8", DecodeLimits(max_bytes=299))


def test_raw_pixels_uint8_and_uint16() -> None:
    arr = _rgb(5, 7)
    out = decode_frame_image(_frame(arr.tobytes(), raw_shape=(5, 7, 3), raw_dtype="uint8"))
    np.testing.assert_array_equal(out, arr)
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    np.testing.assert_array_equal(decode_raw(gray.tobytes(), (5, 7), "uint8")[:, :, 2], gray)
    rgba = np.dstack([arr, np.zeros((5, 7), np.uint8)])
    np.testing.assert_array_equal(decode_raw(rgba.tobytes(), (5, 7, 4), "uint8"), arr)
    g16 = np.array([[0, 65535, 257 * 9]], dtype="<u2")
    np.testing.assert_array_equal(decode_raw(g16.tobytes(), (1, 3, 1), "uint16")[0, :, 1], [0, 255, 9])


@pytest.mark.parametrize(
    ("shape", "dtype", "reason"),
    [((5, 7, 3), "uint8", "bad_raw_shape"), ((5, 7, 2), "uint8", "bad_raw_shape"),
     ((5,), "uint8", "bad_raw_shape"), ((5, 7, 3), "float32", "bad_raw_dtype"),
     ((1, 53), "uint16", "bad_raw_shape")],
)
def test_raw_wrong_size_or_shape(shape: tuple[int, ...], dtype: str, reason: str) -> None:
    data = b"\0" * (5 * 7 * 3 - 1)  # one byte short of a 5x7x3 uint8 frame
    with pytest.raises(FrameError) as err:
        decode_raw(data, shape, dtype)
    assert (err.value.stage, err.value.reason) == ("decode", reason)


def test_raw_pixel_limit() -> None:
    with pytest.raises(FrameError, match="too_many_pixels"):
        decode_raw(b"\0" * 100, (10, 10), "uint8", DecodeLimits(max_pixels=99))


def test_missing_payload() -> None:
    with pytest.raises(FrameError, match="missing_image"):
        decode_frame_image(_frame(b""))


def test_mask_png_full_and_downscaled() -> None:
    mask = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    full = np.asarray(Image.open(io.BytesIO(encode_mask_png(mask))))
    assert full.shape == (300, 200) and full.dtype == np.uint8
    assert full[0, 0] == 0 and full[-1, -1] == 255
    small = Image.open(io.BytesIO(encode_mask_png(mask, max_side=64)))
    assert small.size == (43, 64) and small.mode == "L"
    rgb = _rgb()
    np.testing.assert_array_equal(decode_image_bytes(encode_png(rgb)), rgb)
    np.testing.assert_array_equal(to_rgb8(np.ones((2, 2), bool))[:, :, 0], 255)


def test_stream_keys_share_one_cluster_slot_per_line() -> None:
    from redis.crc import key_slot

    keys = StreamKeys("inspect")
    assert keys.frames("line-1") == "inspect:{line-1}:frames" == frames_key("line-1")
    assert keys.results("line-1") == results_key("line-1") == "inspect:{line-1}:results"
    assert keys.dead("line-1") == dead_key("line-1") == "inspect:{line-1}:dead"
    slots = {key_slot(k.encode()) for k in (keys.frames("a"), keys.results("a"), keys.dead("a"))}
    assert len(slots) == 1
    assert parse_key("plant:x:{line-7}:results") == ("plant:x", "line-7", "results")
    assert parse_key("something-else") is None
    for bad in ("", "a}b", "a{b", "a b"):
        with pytest.raises(ValueError):
            frames_key(bad)
    with pytest.raises(ValueError):
        StreamKeys("x{y}").frames("a")
