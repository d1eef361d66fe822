"""The daemon as a real process: SIGKILL mid-stream and recovery by another instance; SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.daemon_helpers import HAZELNUT, png_bytes, send_frames, wait_for_results

pytestmark = pytest.mark.redis


def write_config(tmp: Path, redis_url: str, prefix: str, checkpoint: Path, consumer: str) -> Path:
    refs = tmp / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "00.png").write_bytes(png_bytes(HAZELNUT / "good" / "00.png"))
    config = {
        "model": {"arch": "inspectd-tiny", "pretrained": str(checkpoint), "device": "cpu", "threads": 1},
        "redis": {"url": redis_url, "prefix": prefix, "lines": ["l1", "l2"], "block_ms": 100,
                  "claim_idle_ms": 1000, "consumer": consumer, "control_stream": None},
        "batcher": {"max_batch_size": 8, "max_delay_ms": 5, "queue_size": 32},
        "http": {"enabled": False},
        "products": [{"id": "nut", "object_name": "hazelnut", "references": str(refs), "shots": 1},
                     {"id": "grid", "object_name": "grid", "shots": 0}],
        "shutdown_timeout_s": 10,
    }
    path = tmp / f"{consumer}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "inspectd", "run", "--config", str(config)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


async def test_sigkill_then_another_instance_finishes_every_frame(redis_client, redis_url, key_prefix, tmp_path,
                                                                  tiny_checkpoint):
    n = 400
    first = start(write_config(tmp_path, redis_url, key_prefix, tiny_checkpoint, "c1"), tmp_path / "c1.log")
    try:
        sent = await send_frames(redis_client, key_prefix, n)
        deadline = time.monotonic() + 60
        while len(await wait_for_results(redis_client, key_prefix, 0, 0)) < 60:
            assert first.poll() is None, (tmp_path / "c1.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "first instance produced no results"
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    in_flight = set()
    for line in ("l1", "l2"):
        for entry in await redis_client.xpending_range(f"{key_prefix}:{{{line}}}:frames", "inspectd", "-", "+", 1000,
                                                       consumername="c1"):
            in_flight.add(entry["message_id"].decode())
    done_before = len(await wait_for_results(redis_client, key_prefix, 0, 0))
    assert done_before < n, "the kill came too late to test anything"

    second = start(write_config(tmp_path, redis_url, key_prefix, tiny_checkpoint, "c2"), tmp_path / "c2.log")
    try:
        deadline = time.monotonic() + 90
        ids: set[str] = set()
        while ids != set(sent) and second.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            results = await wait_for_results(redis_client, key_prefix, 0, 0)
            ids = {r["frame_id"] for r in results}
        await asyncio.sleep(0.5)  # let any straggling duplicate land before counting
        results = await wait_for_results(redis_client, key_prefix, 0, 0)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert ids == set(sent), "frames lost"
    counts = Counter(r["frame_id"] for r in results)
    duplicates = {f for f, c in counts.items() if c > 1}
    dup_entries = {r["entry_id"] for r in results if r["frame_id"] in duplicates}
    assert dup_entries <= in_flight, "a duplicate for a frame that was not in flight at the kill"
    assert len(duplicates) <= 32  # bounded by the permits (queue_size)
    for frame_id in duplicates:
        copies = [r for r in results if r["frame_id"] == frame_id]
        assert len({r["entry_id"] for r in copies}) == 1  # same input entry: consumers can de-duplicate
    for line in ("l1", "l2"):
        assert (await redis_client.xpending(f"{key_prefix}:{{{line}}}:frames", "inspectd"))["pending"] == 0


async def test_sigterm_exits_zero_promptly(redis_client, redis_url, key_prefix, tmp_path, tiny_checkpoint):
    proc = start(write_config(tmp_path, redis_url, key_prefix, tiny_checkpoint, "t1"), tmp_path / "t1.log")
    try:
        await send_frames(redis_client, key_prefix, 100)
        deadline = time.monotonic() + 60
        while not await wait_for_results(redis_client, key_prefix, 0, 0):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "t1.log").read_text()[-2000:]
            await asyncio.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    done = await wait_for_results(redis_client, key_prefix, 0, 0)
    for line in ("l1", "l2"):
        assert (await redis_client.xpending(f"{key_prefix}:{{{line}}}:frames", "inspectd"))["pending"] == 0
    assert 0 < len(done) <= 100
