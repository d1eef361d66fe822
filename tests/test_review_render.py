"""Rendering one scored frame for the console's review: the frame is decoded again from its bytes, under the
daemon's decode limits, and shrunk to the review size only here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.review import render_item
from inspectd.streams.codec import DecodeLimits
from inspectd.streams.schema import Frame, FrameError, Result

GRID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad" / "grid" / "test"


def grid_frame(width: int = 1024, height: int = 768) -> Frame:
    image = Image.open(sorted((GRID / "broken").glob("*.png"))[0]).convert("RGB").resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return Frame("grid", "l1", "f1", 0.0, payload=buffer.getvalue())


def result(height: int = 768, width: int = 1024) -> Result:
    mask = np.zeros((height, width), np.float32)
    mask[100:200, 300:500] = 0.9
    return Result("grid", "l1", "f1", 0.0, score=0.9, verdict="NG", threshold=0.5, detector="winclip",
                  state_version="1", mask=mask)


def test_a_frame_is_shrunk_to_the_review_size_and_its_own_size_is_kept() -> None:
    item = render_item("a-1", result(), grid_frame(), keep_original=False, max_side=512)
    assert item.result["size"] == [512, 384] and item.result["frame_size"] == [1024, 768]
    assert Image.open(io.BytesIO(item.image_png)).size == (512, 384)
    assert item.original is None


def test_the_original_is_the_frame_as_sent() -> None:
    frame = grid_frame()
    item = render_item("a-2", result(), frame, keep_original=True, max_side=512)
    assert item.original == frame.payload and item.original_suffix == ".jpg"
    assert item.result["frame_size"] == [1024, 768]


def test_the_re_decode_honours_the_daemons_limits() -> None:
    with pytest.raises(FrameError):
        render_item("a-3", result(), grid_frame(), max_side=512, limits=DecodeLimits(max_pixels=1000))


def test_a_camera_frame_and_a_raw_frame_render_from_their_pixels() -> None:
    pixels = np.asarray(Image.open(sorted((GRID / "broken").glob("*.png"))[0]).convert("RGB").resize((1024, 768)))
    camera = Frame("grid", "l1", "f1", 0.0, image=pixels)  # a source that decoded it already (no bytes)
    raw = Frame("grid", "l1", "f1", 0.0, payload=pixels.tobytes(), raw_shape=pixels.shape, raw_dtype="uint8")
    for frame in (camera, raw):
        item = render_item("a-4", result(), frame, keep_original=True, max_side=512)
        assert item.result["size"] == [512, 384] and item.result["frame_size"] == [1024, 768]
        assert item.original_suffix == ".png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(item.original))), pixels)  # lossless, full size
