"""The daemon end to end against the real Redis: throughput, poison frames, backpressure, shutdown, config."""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, read_stream, send_frames, wait_for_results

pytestmark = pytest.mark.redis


async def run_daemon(config, backbone) -> tuple[InspectDaemon, asyncio.Task]:  # noqa: ANN001
    daemon = InspectDaemon(config, backbone=backbone)
    task = asyncio.create_task(daemon.run())
    for _ in range(600):
        if daemon.started:
            break
        await asyncio.sleep(0.05)
    assert daemon.started
    return daemon, task


async def stop(daemon: InspectDaemon, task: asyncio.Task) -> None:
    daemon.request_stop()
    await asyncio.wait_for(task, 30)


async def test_500_frames_two_products_all_scored(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone):
    config = daemon_config(redis_url, key_prefix, tmp_path)
    daemon, task = await run_daemon(config, tiny_backbone)
    assert daemon.engine._decode is daemon.engine._engine  # CPU default: decode on the engine thread
    sent = await send_frames(redis_client, key_prefix, 500)
    results = await wait_for_results(redis_client, key_prefix, 500, timeout=50)
    await stop(daemon, task)
    assert len(results) == 500
    by_id = {r["frame_id"]: r for r in results}
    assert sorted(by_id) == sorted(sent)
    for frame_id, record in by_id.items():
        index = int(frame_id[1:])
        assert record["product"] == ("nut" if index % 2 == 0 else "grid")
        assert record["line"] == ("l1" if index % 3 else "l2")
        assert record["verdict"] in ("OK", "NG")
        assert record["state_version"] == "1"
        assert 0.0 <= float(record["score"]) <= 1.0
        assert record["entry_id"]
    nut = next(r for r in results if r["product"] == "nut")
    grid = next(r for r in results if r["product"] == "grid")
    assert nut["mask"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "mask" not in grid and grid["mask_note"]
    pending = await redis_client.xpending(f"{key_prefix}:{{l1}}:frames", "inspectd")
    assert pending["pending"] == 0


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (the body is tiny)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


async def test_poison_frames_go_to_dead_letters(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone):
    config = daemon_config(redis_url, key_prefix, tmp_path)
    daemon, task = await run_daemon(config, tiny_backbone)
    key = f"{key_prefix}:{{l1}}:frames"
    good = png_bytes(HAZELNUT / "good" / "07.png")
    await redis_client.xadd(key, frame_fields("nut", "l1", "ok-1", good))
    await redis_client.xadd(key, frame_fields("nut", "l1", "corrupt", b"\x89PNG\r\n\x1a\nnot really"))
    await redis_client.xadd(key, frame_fields("toaster", "l1", "unknown", good))
    await redis_client.xadd(key, frame_fields("nut", "l1", "bomb", declared_png(30000, 30000)))
    await redis_client.xadd(key, {"line": "l1", "frame_id": "nofield", "image": good})  # no product
    await redis_client.xadd(key, frame_fields("grid", "l1", "ok-2", good))
    records = await wait_for_results(redis_client, key_prefix, 6, timeout=20, kinds=("results", "dead"))
    await stop(daemon, task)
    dead = {r["frame_id"]: r for r in await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")}
    scored = {r["frame_id"] for r in await read_stream(redis_client, f"{key_prefix}:{{l1}}:results")}
    assert scored == {"ok-1", "ok-2"}, records
    assert dead["corrupt"]["reason"] == "corrupt_image" and dead["corrupt"]["stage"] == "decode"
    assert dead["unknown"]["reason"] == "unknown_product"
    assert dead["bomb"]["reason"] == "too_many_pixels"
    assert dead["nofield"]["reason"] == "missing_field"
    pending = await redis_client.xpending(key, "inspectd")
    assert pending["pending"] == 0  # dead letters are acked too
    text = daemon.metrics.exposition().decode()
    # a producer-chosen product name is not a label value (cardinality): unknown products count as "_unknown"
    assert 'inspectd_frames_dead_lettered_total{line="l1",product="_unknown",reason="unknown_product"} 1.0' in text
    assert 'product="toaster"' not in text


async def test_backpressure_bounds_frames_in_memory(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone):
    config = daemon_config(redis_url, key_prefix, tmp_path, batcher={"queue_size": 32, "max_batch_size": 8})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await send_frames(redis_client, key_prefix, 5000)
    original = None

    async def slow_score(items):  # noqa: ANN001, ANN202
        await asyncio.sleep(0.05)
        return await original(items)

    task = asyncio.create_task(daemon.run())
    while not daemon.started:
        await asyncio.sleep(0.02)
    original = daemon.engine.score
    daemon.engine.score = slow_score
    peak_in_flight = peak_pending = 0
    for _ in range(30):
        await asyncio.sleep(0.1)
        peak_in_flight = max(peak_in_flight, daemon._in_flight)
        pending = sum([(await redis_client.xpending(f"{key_prefix}:{{{line}}}:frames", "inspectd"))["pending"]
                       for line in ("l1", "l2")])
        peak_pending = max(peak_pending, pending)
    await stop(daemon, task)
    assert 0 < peak_in_flight <= 32
    assert peak_pending <= 32 + 2  # delivered-but-unacked entries never exceed the permits (+ multi-stream spill)
    waiting = sum([await redis_client.xlen(f"{key_prefix}:{{{line}}}:frames") for line in ("l1", "l2")])
    assert waiting == 5000  # the rest is still safely in Redis, not in our memory
    assert daemon.frames_done > 0


async def test_graceful_stop_publishes_and_acks_in_flight(redis_client, redis_url, key_prefix, tmp_path,
                                                          tiny_backbone):
    config = daemon_config(redis_url, key_prefix, tmp_path)
    daemon, task = await run_daemon(config, tiny_backbone)
    await send_frames(redis_client, key_prefix, 120)
    while daemon.frames_done < 10:
        await asyncio.sleep(0.01)
    await stop(daemon, task)
    done = daemon.frames_done
    results = await wait_for_results(redis_client, key_prefix, done, timeout=2)
    assert len(results) == done  # everything read was published...
    for line in ("l1", "l2"):
        pending = await redis_client.xpending(f"{key_prefix}:{{{line}}}:frames", "inspectd")
        assert pending["pending"] == 0  # ...and acked


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"batcher\.max_batch_size: expected int"):
        parse_config({"batcher": {"max_batch_size": "eight"}})
    with pytest.raises(ConfigError, match=r"redis\.lines\[1\]: expected str"):
        parse_config({"redis": {"lines": ["a", 3]}})
    with pytest.raises(ConfigError, match=r"products\[0\]\.thresold: unknown key"):
        parse_config({"products": [{"id": "a", "thresold": {}}]})
    with pytest.raises(ConfigError, match=r"products\[0\]\.id: required"):
        parse_config({"products": [{"object_name": "a"}]})
    with pytest.raises(ConfigError, match=r"model\.cpu_gemm: .*'mkl'"):
        parse_config({"model": {"cpu_gemm": "mkl"}})
    with pytest.raises(ConfigError, match=r"model\.cpu_gemm: 'blas' .*cpu_kernels: torch"):
        parse_config({"model": {"cpu_gemm": "blas", "cpu_kernels": "torch"}})
    with pytest.raises(ConfigError, match=r"model\.cpu_gemm: 'onednn' .*compile: default"):
        parse_config({"model": {"cpu_gemm": "onednn", "compile": "default"}})
    with pytest.raises(ConfigError, match="registry.on_building"):
        parse_config({"registry": {"on_building": "drop"}})
    assert parse_config({}).batcher.max_batch_size == 8


def test_a_product_files_relative_paths_are_relative_to_the_file(tmp_path: Path, monkeypatch) -> None:
    """`threshold.holdout_dir` was left relative (read against the daemon's working directory) while
    `references` beside it was resolved against the product file's folder."""
    import yaml

    from inspectd.daemon.config import load_product_file

    products = tmp_path / "products"
    products.mkdir()
    (products / "nut.yaml").write_text(yaml.safe_dump({"id": "nut", "object_name": "hazelnut", "references": "../refs",
                                                       "threshold": {"holdout_dir": "../holdout"}}))
    monkeypatch.chdir(products.parent.parent)
    product = load_product_file(products / "nut.yaml")
    assert product.references == str(tmp_path / "refs")
    assert product.threshold.holdout_dir == str(tmp_path / "holdout")


def test_example_config_is_valid() -> None:
    from inspectd.daemon.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "config" / "inspectd.yaml")
    assert config.model.arch == "ViT-B-16-plus-240"


async def test_two_instances_in_one_group_share_the_load(redis_client, redis_url, key_prefix, tmp_path,
                                                         tiny_backbone):
    first = daemon_config(redis_url, key_prefix, tmp_path, redis={"consumer": "a", "url": redis_url,
                                                                  "prefix": key_prefix, "lines": ["l1", "l2"],
                                                                  "block_ms": 50, "control_stream": None})
    second = daemon_config(redis_url, key_prefix, tmp_path, redis={"consumer": "b", "url": redis_url,
                                                                   "prefix": key_prefix, "lines": ["l1", "l2"],
                                                                   "block_ms": 50, "control_stream": None})
    first.batcher.max_batch_size = second.batcher.max_batch_size = 4
    a, task_a = await run_daemon(first, tiny_backbone)
    b, task_b = await run_daemon(second, tiny_backbone)
    sent = await send_frames(redis_client, key_prefix, 200)
    results = await wait_for_results(redis_client, key_prefix, 200, timeout=40)
    await stop(a, task_a)
    await stop(b, task_b)
    assert sorted(r["frame_id"] for r in results) == sorted(sent)  # each exactly once
    assert a.frames_done > 20 and b.frames_done > 20
    assert a.frames_done + b.frames_done == 200


async def test_a_nan_score_is_a_detector_error_not_an_ok_verdict(redis_client, redis_url, key_prefix, tmp_path,
                                                                 tiny_backbone) -> None:
    """NaN >= threshold is False: a detector giving NaN passed every frame as OK (a defective part shipped) and made
    the score histogram's sum NaN until restart. Found by a review helper."""
    import torch

    from inspectd.detectors.base import DetectorOutput

    config = daemon_config(redis_url, key_prefix, tmp_path, batcher={"max_batch_size": 16, "max_delay_ms": 300,
                                                                    "queue_size": 64})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        detector = daemon.registry.get("grid").detector
        real = detector.score

        def nan_scores(features, state):  # noqa: ANN001, ANN202
            out = real(features, state)
            return DetectorOutput(torch.full_like(out.scores, float("nan")), out.maps)

        detector.score = nan_scores
        image = png_bytes(HAZELNUT / "good" / "05.png")
        for i in range(4):
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames",
                                    frame_fields("nut" if i % 2 == 0 else "grid", "l1", f"f{i}", image))
        out = await wait_for_results(redis_client, key_prefix, 4, timeout=30, kinds=("results", "dead"))
        pending = await redis_client.xpending(f"{key_prefix}:{{l1}}:frames", config.redis.group)
        exposition = daemon.metrics.exposition().decode()
    finally:
        await daemon.shutdown()
    verdicts = {r["frame_id"]: r.get("verdict") or r.get("reason") for r in out}
    assert verdicts["f1"] == verdicts["f3"] == "detector_error", verdicts
    assert verdicts["f0"] in ("OK", "NG") and verdicts["f2"] in ("OK", "NG"), verdicts
    assert "nan" in next(r for r in out if r["frame_id"] == "f1")["detail"].lower()
    assert pending["pending"] == 0 and len(out) == 4
    assert "inspectd_anomaly_score_sum" in exposition and "NaN" not in exposition


async def test_one_products_detector_error_dead_letters_only_its_own_frames(redis_client, redis_url, key_prefix,
                                                                            tmp_path, tiny_backbone) -> None:
    """One try around a whole batch's scoring: one product's detector raising made every product's frames in the
    batch detector_error dead letters. Found by a review helper."""
    config = daemon_config(redis_url, key_prefix, tmp_path, batcher={"max_batch_size": 16, "max_delay_ms": 300,
                                                                    "queue_size": 64})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        def broken(features, state):  # noqa: ANN001, ANN202
            raise RuntimeError("grid's detector bug")

        daemon.registry.get("grid").detector.score = broken
        image = png_bytes(HAZELNUT / "good" / "05.png")
        pipe = redis_client.pipeline(transaction=False)
        for i in range(6):
            product = "nut" if i % 2 == 0 else "grid"
            pipe.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields(product, "l1", f"f{i}", image))
        await pipe.execute()
        out = await wait_for_results(redis_client, key_prefix, 6, timeout=30, kinds=("results", "dead"))
    finally:
        await daemon.shutdown()
    verdicts = {r["frame_id"]: r.get("verdict") or r.get("reason") for r in out}
    assert {k: v for k, v in verdicts.items() if k in ("f1", "f3", "f5")} == dict.fromkeys(("f1", "f3", "f5"),
                                                                                           "detector_error")
    assert all(verdicts[k] in ("OK", "NG") for k in ("f0", "f2", "f4")), verdicts
    assert daemon.metrics is not None and len(out) == 6

