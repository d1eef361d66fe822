"""``inspectd send`` / ``inspectd tail`` round trip through a real Redis via ``inspectd.cli.main``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from inspectd.cli import main
from inspectd.streams.codec import decode_frame_image
from inspectd.streams.message import parse_frame_fields
from inspectd.streams.records import MaskPolicy
from inspectd.streams.redis_keys import dead_key, frames_key, results_key
from inspectd.streams.redis_sink import dead_letter_fields, result_fields
from inspectd.streams.schema import DeadLetter, Frame, Result

pytestmark = pytest.mark.redis

GRID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad" / "grid" / "test" / "bent"


@pytest.fixture
def sync_redis(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{key_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _result_fields(frame_id: str, score: float, verdict: str) -> dict[str, Any]:
    frame = Frame(product="grid", line="l1", frame_id=frame_id, captured_at=1.0)
    result = Result(product=frame.product, line=frame.line, frame_id=frame_id, captured_at=1.0, score=score,
                    verdict=verdict, threshold=0.5, detector="tiny", state_version="v7")
    return result_fields(result, MaskPolicy.parse("none"))


def test_send_xadds_decodable_frames(sync_redis: redis.Redis, redis_url: str, key_prefix: str,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = np.arange(6 * 5, dtype=np.uint16).reshape(6, 5) * 1000
    np.save(tmp_path / "raw.npy", raw)
    images = [str(GRID / "000.png"), str(GRID / "001.png"), str(tmp_path / "raw.npy")]
    rc = main(["send", *images, "--product", "grid", "--line", "l1", "--redis", redis_url,
               "--prefix", key_prefix, "--meta", '{"shift": 2}'])
    assert rc == 0
    stream = frames_key("l1", key_prefix)
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    entries = sync_redis.xrange(stream)
    assert len(entries) == 3
    frames = [parse_frame_fields(f, entry_id=i.decode(), source="t") for i, f in entries]
    assert all(isinstance(f, Frame) for f in frames)
    assert [f.frame_id for f in frames] == [e.decode() for e, _ in entries]  # the entry id: unique everywhere
    assert frames[0].product == "grid" and frames[0].line == "l1"
    assert frames[0].meta == {"shift": 2, "file": str(GRID / "000.png")}
    expected = np.asarray(Image.open(GRID / "000.png"))
    np.testing.assert_array_equal(decode_frame_image(frames[0])[:, :, 0], expected)
    assert frames[2].raw_shape == (6, 5) and frames[2].raw_dtype == "uint16"
    assert decode_frame_image(frames[2]).shape == (6, 5, 3)
    assert main(["send", str(GRID / "000.png"), "--product", "grid", "--line", "l1", "--redis", redis_url,
                 "--prefix", key_prefix, "--frame-id", "path"]) == 0
    last = sync_redis.xrevrange(stream, count=1)[0]
    assert parse_frame_fields(last[1], entry_id=last[0].decode(), source="t").frame_id == str(GRID / "000.png")
    assert main(["send", str(tmp_path / "missing.png"), "--product", "p", "--line", "l1",
                 "--redis", redis_url, "--prefix", key_prefix]) == 1


def test_tail_prints_results_and_follows(sync_redis: redis.Redis, redis_url: str, key_prefix: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    stream = results_key("l1", key_prefix)
    for i in range(3):
        sync_redis.xadd(stream, _result_fields(f"f{i}", 0.1 * i, "OK"))
    assert main(["tail", "--redis", redis_url, "--prefix", key_prefix, "--line", "l1", "--count", "2"]) == 0
    out = [line.split(" ", 2)[2] for line in capsys.readouterr().out.strip().splitlines()]  # after the time
    assert out == ["f1 grid OK score=0.1000 threshold=0.5000 version=v7",
                   "f2 grid OK score=0.2000 threshold=0.5000 version=v7"]

    timer = threading.Timer(0.2, lambda: sync_redis.xadd(stream, _result_fields("late", 0.9, "NG")))
    timer.start()
    assert main(["tail", "--redis", redis_url, "--stream", stream, "--count", "1", "--follow",
                 "--timeout", "1.0"]) == 0
    timer.join()
    out = [line.split(" ", 2)[2] for line in capsys.readouterr().out.strip().splitlines()]
    assert out == ["f2 grid OK score=0.2000 threshold=0.5000 version=v7",
                   "late grid NG score=0.9000 threshold=0.5000 version=v7"]

    dead = DeadLetter(reason="corrupt_image", stage="decode", product="grid", line="l1", frame_id="bad")
    sync_redis.xadd(dead_key("l1", key_prefix), dead_letter_fields(dead))
    assert main(["tail", "--redis", redis_url, "--prefix", key_prefix, "--line", "l1", "--dead"]) == 0
    assert capsys.readouterr().out.strip() == "bad grid DEAD decode/corrupt_image"


def test_tail_json_and_save_masks(sync_redis: redis.Redis, redis_url: str, key_prefix: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import json

    stream = results_key("l1", key_prefix)
    with_mask = Result(product="grid", line="l1", frame_id="cam/01.png", captured_at=1.0, score=0.7, verdict="NG",
                       threshold=0.5, detector="tiny", state_version="3",
                       mask=np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    sync_redis.xadd(stream, result_fields(with_mask, MaskPolicy.parse("full")))
    sync_redis.xadd(stream, _result_fields("no-mask", 0.1, "OK"))
    assert main(["tail", "--redis", redis_url, "--stream", stream, "--count", "5", "--json",
                 "--save", str(tmp_path / "masks")]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [r["frame_id"] for r in records] == ["cam/01.png", "no-mask"]
    assert records[0]["mask_bytes"] > 0 and records[0]["verdict"] == "NG" and float(records[0]["threshold"]) == 0.5
    saved = next((tmp_path / "masks" / "grid").glob("cam_01-*.mask.png"))  # a short hash: "cam/" was sanitised
    assert Image.open(saved).size == (8, 8)
    assert f"mask saved to {saved}" in captured.err and "no-mask: no mask saved (" in captured.err


def test_tail_save_gives_every_frame_its_own_readable_files(sync_redis: redis.Redis, redis_url: str,
                                                            key_prefix: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Ids that sanitise alike (``a/x.png``, ``a_x.png``) and repeated ids (sent twice with --frame-id path; a folder
    frame dropped twice) each get their own mask and overlay, named like the JSONL sink names masks."""
    frames, results = frames_key("l1", key_prefix), results_key("l1", key_prefix)
    cases = [("a/x.png", "redis"), ("a_x.png", "redis"), ("a_x.png", "redis"), ("dup.png", "folder"),
             ("dup.png", "folder")]
    for i, (frame_id, source) in enumerate(cases):
        image = (GRID / f"00{i % 2}.png").read_bytes()
        entry = sync_redis.xadd(frames, {"product": "grid", "frame_id": frame_id, "image": image}).decode()
        mask = np.full((8, 8), (i + 1) / 10, np.float32)
        result = Result(product="grid", line="l1", frame_id=frame_id, captured_at=1.0, score=0.7, verdict="NG",
                        threshold=0.5, detector="tiny", state_version="3", mask=mask,
                        entry_id=entry if source == "redis" else frame_id,
                        source=f"redis:{frames}" if source == "redis" else "folder:/in")
        sync_redis.xadd(results, result_fields(result, MaskPolicy.parse("full")))
    assert main(["tail", "--redis", redis_url, "--stream", results, "--count", "10",
                 "--save", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    saved = sorted(p.name for p in (tmp_path / "s" / "grid").iterdir())
    assert len(saved) == 3 * 2 + 2, (saved, err)  # a mask each and an overlay for the Redis frames: none overwritten
    assert not [name for name in saved if ".png." in name]  # no doubled suffix (x.png.mask.png)
    mask_files = [name for name in saved if name.endswith(".mask.png")]
    assert sum(name.startswith("a_x-") for name in mask_files) == 1  # "a/x.png": sanitised, so a short hash
    assert sum(name.startswith("a_x_") for name in mask_files) == 2  # "a_x.png" twice: + its input entry id
    assert sum(name.startswith("dup_") for name in mask_files) == 2  # folder ids repeat: the result's entry id
    levels = sorted(int(np.asarray(Image.open(tmp_path / "s" / "grid" / name)).max()) for name in mask_files)
    assert len(set(levels)) == len(cases)  # each result's own mask
    assert err.count("overlay to") == 3 and err.count("no overlay: the frame is no longer in the input stream") == 2


def test_send_refuses_npy_pixels_it_cannot_send_and_sends_the_rest(sync_redis: redis.Redis, redis_url: str,
                                                                   key_prefix: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = {"float.npy": np.linspace(0, 1, 6 * 5).reshape(6, 5),  # was cast to zeros
           "int32.npy": np.arange(6 * 5, dtype=np.int32).reshape(6, 5) * 100,  # was wrapped mod 256
           "flat.npy": np.zeros(30, np.uint8), "stack.npy": np.zeros((2, 6, 5, 3), np.uint8),
           "channels.npy": np.zeros((6, 5, 7), np.uint8), "empty.npy": np.zeros((0, 5), np.uint8)}
    for name, array in bad.items():
        np.save(tmp_path / name, array)
    np.save(tmp_path / "ok8.npy", np.full((6, 5, 3), 200, np.uint8))
    np.save(tmp_path / "big_endian16.npy", (np.arange(30).reshape(6, 5) * 2000).astype(">u2"))
    names = ["float.npy", "ok8.npy", "int32.npy", "flat.npy", "big_endian16.npy", "stack.npy", "channels.npy",
             "empty.npy"]
    rc = main(["send", *(str(tmp_path / n) for n in names), "--product", "grid", "--line", "l1",
               "--redis", redis_url, "--prefix", key_prefix])
    assert rc == 1  # like an unreadable file: each one named, the others sent
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert [line.split(":", 1)[0] for line in errors] == [str(tmp_path / n) for n in bad], captured.err
    assert "float64" in errors[0] and "uint8 or uint16" in errors[0] and "int32" in errors[1]
    entries = sync_redis.xrange(frames_key("l1", key_prefix))
    frames = [parse_frame_fields(f, entry_id=i.decode(), source="t") for i, f in entries]
    assert [f.meta["file"] for f in frames] == [str(tmp_path / "ok8.npy"), str(tmp_path / "big_endian16.npy")]
    assert (decode_frame_image(frames[0]) == 200).all()
    assert frames[1].raw_dtype == "uint16"
    np.testing.assert_array_equal(np.frombuffer(frames[1].payload, "<u2").reshape(6, 5),
                                  np.arange(30).reshape(6, 5) * 2000)  # the values, not their bytes swapped
