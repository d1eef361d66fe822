"""The wire format's details, one test per defect of issue 22: big-endian uint16 pixels (`byte_order`), `meta`
returned byte for byte, dead letters that keep the frame's fields at every stage, 16-bit masks and the threshold
on the mask's scale (`sinks.mask_bits`, `mask_threshold`), and `demo_weights` for random-weight checkpoint files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.streams.codec import decode_mask_png, decode_raw, encode_mask_png
from inspectd.streams.message import frame_fields, parse_frame_fields
from inspectd.streams.reasons import Reason
from inspectd.streams.records import MaskPolicy
from inspectd.streams.redis_keys import StreamKeys
from inspectd.streams.redis_sink import RedisResultSink, result_fields
from inspectd.streams.schema import DeadLetter, Frame, Result
from tests.daemon_helpers import HAZELNUT, png_bytes
from tests.test_wire_spec import META, TS, encoded, text, wait_for_entries, wire_config, wire_errors


def hazelnut_rgb(size: int = 96) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_bytes(HAZELNUT / "colour" / "03.png", size))))


async def run_frames(redis_client: Any, redis_url: str, prefix: str, tmp: Path, backbone: Any,
                     entries: list[dict], n_results: int, n_dead: int, **over: Any
                     ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Start a daemon on line l1, XADD ``entries``, wait for the answers; (results, dead letters) by frame id."""
    daemon = InspectDaemon(wire_config(redis_url, prefix, tmp, **over), backbone=backbone)
    await daemon.start()
    keys = StreamKeys(prefix)
    try:
        for fields in entries:
            await redis_client.xadd(keys.frames("l1"), fields)
        results = await wait_for_entries(redis_client, [keys.results("l1")], n_results)
        dead = await wait_for_entries(redis_client, [keys.dead("l1")], n_dead)
    finally:
        await daemon.shutdown()
    by_id = {text(f)["frame_id"]: f for _, f in results}
    return by_id, {text(f)["frame_id"]: text(f) for _, f in dead}


# ----------------------------------------------------------------------------- byte order of raw uint16
def test_raw_uint16_is_read_in_the_byte_order_the_frame_names() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    little = decode_raw(pixels.astype("<u2").tobytes(), pixels.shape, "uint16")
    big = decode_raw(pixels.astype(">u2").tobytes(), pixels.shape, "uint16", byte_order="big")
    np.testing.assert_array_equal(big, little)
    np.testing.assert_array_equal(little, ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    fields = frame_fields("p", "l1", "f", pixels.astype(">u2").tobytes(), shape=pixels.shape, dtype="uint16",
                          byte_order="big")
    frame = parse_frame_fields(fields, entry_id="1-0", source="t", default_line="l1")
    assert isinstance(frame, Frame) and frame.raw_byte_order == "big"
    bad = parse_frame_fields({**fields, "byte_order": "middle"}, entry_id="1-0", source="t", default_line="l1")
    assert isinstance(bad, DeadLetter) and (bad.reason, bad.stage) == (Reason.BAD_BYTE_ORDER, "parse")
    assert "'middle'" in bad.detail and bad.fields["byte_order"] == "middle"


async def test_big_endian_uint16_scores_the_same_as_little_endian_and_8_bit(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    rgb = hazelnut_rgb()
    wide = rgb.astype(np.uint16) * 257  # 8-bit v as 16-bit: reduces back to v exactly
    entries = [frame_fields("wire", "l1", "u8", rgb.tobytes(), shape=rgb.shape, dtype="uint8"),
               frame_fields("wire", "l1", "le", wide.astype("<u2").tobytes(), shape=rgb.shape, dtype="uint16"),
               frame_fields("wire", "l1", "be", wide.astype(">u2").tobytes(), shape=rgb.shape, dtype="uint16",
                            byte_order="big"),
               frame_fields("wire", "l1", "png", encoded(rgb))]
    # One frame per batch: the same pixels then take the same arithmetic. Batched together, a frame's row position
    # picks a different GEMM tail kernel on some CPUs and the scores differ in the last fp32 bits (CI saw 6e-8).
    results, _ = await run_frames(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone, entries, 4, 0,
                                  batcher={"max_batch_size": 1})
    scores = {frame_id: float(fields[b"score"]) for frame_id, fields in results.items()}
    assert scores["be"] == scores["le"] == scores["u8"] == scores["png"], scores
    assert results["be"][b"mask"] == results["le"][b"mask"]
    assert all(fields[b"demo_weights"] == b"1" for fields in results.values())  # the tiny checkpoint is random


# ----------------------------------------------------------------------------- meta as sent
def test_meta_is_returned_byte_for_byte_by_the_result_fields() -> None:
    frame = parse_frame_fields({"product": "p", "image": b"x", "meta": META}, entry_id="1-0", source="t",
                               default_line="l1")
    assert isinstance(frame, Frame) and frame.meta == {"lot": "Ä-17", "note": "naïve ✓ 東京", "n": 1.5}
    result = Result(product="p", line="l1", frame_id="f", captured_at=1.0, score=0.1, verdict="OK", threshold=0.5,
                    detector="winclip", state_version="1", meta=frame.meta, meta_raw=frame.meta_raw)
    assert result_fields(result, MaskPolicy())["meta"] == META
    no_meta = Result(product="p", line="l1", frame_id="f", captured_at=1.0, score=0.1, verdict="OK", threshold=0.5,
                     detector="winclip", state_version="1")
    assert result_fields(no_meta, MaskPolicy())["meta"] == "{}"


def test_meta_that_is_not_utf8_and_ts_that_is_not_finite_are_dead_letters() -> None:
    base = {"product": "p", "image": b"x"}
    latin1 = parse_frame_fields({**base, "meta": '{"a": "é"}'.encode("latin-1")}, entry_id="1-0", source="t")
    assert isinstance(latin1, DeadLetter) and latin1.reason == Reason.BAD_META and "UTF-8" in latin1.detail
    for ts in ("nan", "inf", "-inf"):
        dead = parse_frame_fields({**base, "ts": ts}, entry_id="1-0", source="t")
        assert isinstance(dead, DeadLetter) and dead.reason == Reason.BAD_TS, ts


async def test_meta_with_non_ascii_and_whitespace_comes_back_byte_identical(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    good = png_bytes(HAZELNUT / "good" / "03.png")
    entries = [frame_fields("wire", "l1", "meta", good, meta=META),
               frame_fields("wire", "l1", "compact", good, meta=b'{"a":1}'),
               frame_fields("wire", "l1", "none", good)]
    results, _ = await run_frames(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone, entries, 3, 0)
    assert results["meta"][b"meta"] == META
    assert results["compact"][b"meta"] == b'{"a":1}'
    assert results["none"][b"meta"] == b"{}"


# ----------------------------------------------------------------------------- dead letters keep the fields
async def test_decode_and_product_stage_dead_letters_keep_meta_and_ts(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    def frame(frame_id: str, image: bytes, product: str = "wire") -> dict:
        return frame_fields(product, "l1", frame_id, image, captured_at=float(TS), meta=META) | {"extra": "kept"}

    entries = [frame("corrupt", b"GIF89a broken"), frame("strip", encoded(np.zeros((10, 9000, 3), np.uint8))),
               frame("unknown", png_bytes(HAZELNUT / "good" / "03.png"), product="no-such-product")]
    sizes = {str(e["frame_id"]): len(e["image"]) for e in entries}
    _, dead = await run_frames(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone, entries, 0, 3)
    assert {k: (d["stage"], d["reason"]) for k, d in dead.items()} == {
        "corrupt": ("decode", "corrupt_image"), "strip": ("decode", "too_many_tiles"),
        "unknown": ("product", "unknown_product")}
    for frame_id, letter in dead.items():
        fields = json.loads(letter["fields"])
        assert fields["meta"] == META.decode() and fields["ts"] == repr(float(TS)), frame_id
        assert fields["extra"] == "kept" and fields["frame_id"] == frame_id and "image" not in fields
        assert int(fields["image_bytes"]) == sizes[frame_id]
        assert wire_errors("DeadLetterFields", letter) == []


async def test_folder_dead_letters_carry_the_files_fields(tmp_path: Path) -> None:
    from inspectd.streams.folder import FolderSource

    (tmp_path / "loose.png").write_bytes(png_bytes(HAZELNUT / "good" / "03.png", 16))
    source = FolderSource(tmp_path, poll_interval_s=0.02, settle_s=0.0)
    try:
        [letter] = await source.read(4, timeout_s=2)
    finally:
        source.close()
    assert isinstance(letter, DeadLetter) and letter.reason == Reason.NO_PRODUCT
    assert json.loads(letter.fields["meta"]) == {"path": str(tmp_path / "loose.png")}
    assert letter.fields["frame_id"] == "loose.png" and "ts" in letter.fields


# ----------------------------------------------------------------------------- masks: bit depth and threshold
def _scored(mask: np.ndarray, scale: float = 1.0, threshold: float = 0.2) -> Result:
    return Result(product="p", line="l1", frame_id="f", captured_at=1.0, score=0.3, verdict="NG", threshold=threshold,
                  detector="winclip", state_version="1", mask=mask, mask_scale=scale)


def test_masks_are_8_bit_by_default_and_16_bit_on_request_with_the_threshold_on_their_scale() -> None:
    rng = np.random.default_rng(0)
    mask = (0.13 + 0.14 * rng.random((40, 60))).astype(np.float32)  # a typical WinCLIP map: 0.13 .. 0.27
    eight = result_fields(_scored(mask), MaskPolicy("full", None))
    assert (eight["mask_bits"], float(eight["mask_threshold"])) == ("8", 0.2 * 255)
    decoded8, bits8 = decode_mask_png(eight["mask"])
    assert bits8 == 8 and decoded8.shape == (40, 60) and len(np.unique(decoded8)) <= 37  # 34 .. 70 only
    sixteen = result_fields(_scored(mask, scale=2.0), MaskPolicy("full", None), mask_bits=16)
    assert (sixteen["mask_bits"], float(sixteen["mask_threshold"])) == ("16", 0.2 / 2.0 * 65535)
    decoded16, bits16 = decode_mask_png(sixteen["mask"])
    assert bits16 == 16 and Image.open(io.BytesIO(sixteen["mask"])).mode == "I;16"
    np.testing.assert_allclose(decoded16 * 2.0, mask, atol=2.0 / 65535)  # map = pixel / 65535 * mask_scale
    assert len(np.unique(decoded16)) > 1000
    assert wire_errors("ResultFields", {**eight, "meta": "{}"}) == []
    small = result_fields(_scored(mask), MaskPolicy("downscaled", 20), mask_bits=16)
    assert decode_mask_png(small["mask"])[0].shape == (13, 20)
    with pytest.raises(ValueError, match="mask bits"):
        encode_mask_png(mask, None, 12)


def test_mask_bits_is_a_validated_sink_setting() -> None:
    assert parse_config({"sinks": {"mask_bits": 16}}).sinks.mask_bits == 16
    assert parse_config({}).sinks.mask_bits == 8
    for bad in (12, True, "16"):
        with pytest.raises(ConfigError, match="sinks.mask_bits"):
            parse_config({"sinks": {"mask_bits": bad}})
    with pytest.raises(ValueError, match="mask bits"):
        RedisResultSink(None, mask_bits=4)


def test_the_jsonl_sink_and_overlay_read_16_bit_masks(tmp_path: Path) -> None:
    from inspectd.commands.overlay import load_map
    from inspectd.streams.jsonl import JsonlSink

    mask = np.linspace(0.0, 1.0, 30 * 20, dtype=np.float32).reshape(20, 30)
    sink = JsonlSink(tmp_path / "r.jsonl", mask_dir=tmp_path / "masks", mask_bits=16,
                     default_mask_policy=MaskPolicy("full", None))
    sink.write_batch([_scored(mask)])
    sink.close()
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["mask_bits"] == 16 and record["mask_threshold"] == pytest.approx(0.2 * 65535)
    np.testing.assert_allclose(load_map(record["mask_path"]), mask, atol=1 / 65535)


# ----------------------------------------------------------------------------- demo_weights
def test_a_random_weight_checkpoint_file_says_demo_weights_and_an_unmarked_one_does_not(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from inspectd.detectors import weights
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.tiny import write_tiny_checkpoint

    marked = write_tiny_checkpoint(tmp_path / "marked", image_size=64, patch_size=16)
    assert weights.marked_random(weights.resolve("inspectd-tiny", str(marked)))
    assert weights.marked_random(weights.resolve("inspectd-tiny", str(marked / "open_clip_model.safetensors")))
    assert ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(marked), device="cpu")).demo_weights is True
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(load_file(str(marked / "open_clip_model.safetensors")), str(plain / "open_clip_model.safetensors"))
    config = json.loads((marked / "open_clip_config.json").read_text())
    config.pop(weights.RANDOM_MARKER)
    (plain / "open_clip_config.json").write_text(json.dumps(config))
    assert not weights.marked_random(weights.resolve("inspectd-tiny", str(plain)))
    assert ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(plain), device="cpu")).demo_weights is False


@pytest.mark.parametrize("shape", ["[4.9, 6.2, 3]", "[4.0, 6, 3]", "[true, 6, 3]", "4.9,6,3"])
def test_a_shape_that_is_not_whole_numbers_is_a_bad_shape_not_truncated(shape: str) -> None:
    """JSON [4.9, 6.2, 3] was read as (4, 6, 3): bytes of that size were then taken as such an image."""
    from inspectd.streams.message import parse_frame_fields
    from inspectd.streams.schema import DeadLetter

    fields = {"product": "p", "line": "l1", "frame_id": "f", "image": bytes(4 * 6 * 3), "shape": shape}
    parsed = parse_frame_fields(fields, entry_id="1-0", source="redis:inspect:{l1}:frames")
    assert isinstance(parsed, DeadLetter) and parsed.reason == "bad_shape", parsed
