"""Operations through the running daemon: /metrics values after scoring, health, sd_notify READY/WATCHDOG,
the embedded demo default, and a camera (video file) source feeding the engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import parse_config
from tests.daemon_helpers import HAZELNUT, daemon_config, send_frames, wait_for_results


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.redis
async def test_metrics_scrape_after_scoring(redis_client, redis_url, key_prefix, tmp_path, tiny_backbone):
    config = daemon_config(redis_url, key_prefix, tmp_path, http={"enabled": True, "port": 0})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    task = asyncio.create_task(daemon.run())
    while not daemon.started:
        await asyncio.sleep(0.05)
    await send_frames(redis_client, key_prefix, 30)
    results = await wait_for_results(redis_client, key_prefix, 30, timeout=30)
    assert len(results) == 30
    await asyncio.sleep(0.2)
    base = f"http://127.0.0.1:{daemon.http_port}"
    async with aiohttp.ClientSession() as http:
        text = await (await http.get(f"{base}/metrics")).text()
        health = await http.get(f"{base}/healthz")
        ready = await http.get(f"{base}/readyz")
        ready_body = await ready.json()
    daemon.request_stop()
    await task
    assert health.status == 200 and ready.status == 200 and ready_body["checks"]["redis"] is True
    ng = {p: sum(1 for r in results if r["product"] == p and r["verdict"] == "NG") for p in ("nut", "grid")}
    assert metric_value(text, "inspectd_frames_scored_total", product="nut") == 15
    assert metric_value(text, "inspectd_frames_scored_total", product="grid") == 15
    assert metric_value(text, "inspectd_frames_scored_total", product="nut", verdict="NG") == ng["nut"]
    assert metric_value(text, "inspectd_frames_received_total") == 30
    assert metric_value(text, "inspectd_anomaly_score_count", product="grid") == 15
    assert metric_value(text, "inspectd_stage_duration_seconds_count", stage="forward") == 30
    assert metric_value(text, "inspectd_batch_size_sum") == 30
    assert metric_value(text, "inspectd_product_state_version", product="nut") == 1
    assert 'inspectd_model_info{arch="inspectd-tiny"' in text


@pytest.mark.redis
async def test_every_read_entry_is_received_and_a_refused_one_is_logged(redis_client, redis_url, key_prefix,
                                                                         tmp_path, tiny_backbone, caplog) -> None:
    """received = scored + dead-lettered: entries refused before decoding (a missing field, a bad shape) were
    counted as dead letters but never as received, and left no log line."""
    import logging

    from inspectd.streams.message import frame_fields
    from tests.daemon_helpers import png_bytes

    config = daemon_config(redis_url, key_prefix, tmp_path)
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    caplog.set_level(logging.WARNING, logger="inspectd.daemon.app")
    try:
        stream = f"{key_prefix}:{{l1}}:frames"
        image = png_bytes(HAZELNUT / "good" / "05.png")
        for i in range(3):
            await redis_client.xadd(stream, frame_fields("nut", "l1", f"ok{i}", image))
        await redis_client.xadd(stream, {"product": "nut", "line": "l1", "frame_id": "no-image"})
        await redis_client.xadd(stream, {**frame_fields("nut", "l1", "bad-shape", image), "shape": "0,0"})
        out = await wait_for_results(redis_client, key_prefix, 5, timeout=30, kinds=("results", "dead"))
        text = daemon.metrics.exposition().decode()
    finally:
        await daemon.shutdown()
    assert sorted(r["reason"] for r in out if "reason" in r) == ["bad_shape", "missing_field"], out
    scored = metric_value(text, "inspectd_frames_scored_total")
    dead = metric_value(text, "inspectd_frames_dead_lettered_total")
    assert (scored, dead) == (3, 2)
    assert metric_value(text, "inspectd_frames_received_total") == scored + dead
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dead letter")]
    assert any("no-image" in m and "missing_field" in m for m in logged), logged


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    return sock, path


def test_demo_default_runs_with_nothing_else_and_notifies_systemd(tmp_path: Path) -> None:
    """The README's first command (embedded default), under a NOTIFY_SOCKET the test owns."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("00.png", "01.png", "02.png"):
        (inbox / name).write_bytes((HAZELNUT / "colour" / name).read_bytes())
    sock, path = notify_socket(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000", WATCHDOG_PID="", PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_PID")
    proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "--demo", "--input", str(inbox),
                             "--out", str(tmp_path / "out"), "--port", "0", "--idle-exit", "2"],
                            env=env, stdout=(tmp_path / "demo.log").open("w"), stderr=subprocess.STDOUT)
    messages: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())
        proc.wait(timeout=30)
        output = (tmp_path / "demo.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0, output[-3000:]
    assert any("READY=1" in m for m in messages), messages
    assert any("WATCHDOG=1" in m for m in messages), messages
    assert any("STOPPING=1" in m for m in messages), messages
    assert "RANDOM weights" in output  # demo mode is never silent
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["frame_id"] for r in records) == ["00.png", "01.png", "02.png"]
    assert all(r["demo_weights"] is True and r["kind"] == "result" for r in records)
    assert all(Path(r["mask_path"]).is_file() for r in records)


def write_video(path: Path, frames: int = 12) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    base = cv2.imread(str(HAZELNUT / "good" / "00.png"))
    for i in range(frames):
        frame = cv2.resize(base, (160, 120))
        cv2.putText(frame, str(i), (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        writer.write(frame)
    writer.release()


async def test_camera_video_file_through_the_daemon(tmp_path: Path, tiny_backbone) -> None:
    video = tmp_path / "line.avi"
    write_video(video)
    config = parse_config({
        "model": {"device": "cpu"},
        "sources": {"redis": False, "cameras": [{"name": "cam", "uri": str(video), "product": "nut",
                                                  "line": "l9", "policy": "queue", "queue_size": 64,
                                                  "reconnect": False}]},
        "sinks": {"redis": False, "jsonl": str(tmp_path / "results.jsonl")},
        "http": {"enabled": False},
        "products": [{"id": "nut", "object_name": "hazelnut", "shots": 0}],
    })
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + 30
    while daemon.frames_done < 12 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    daemon.request_stop()
    await task
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12
    assert {r["product"] for r in records} == {"nut"} and {r["line"] for r in records} == {"l9"}
    assert sorted(int(r["frame_id"].split("-")[-1]) for r in records) == list(range(1, 13))
    assert np.isfinite([r["score"] for r in records]).all()


async def test_demo_default_needs_no_redis(tmp_path: Path, tiny_backbone) -> None:
    """The embedded default must run where no Redis server exists at all."""
    from inspectd.daemon.demo import demo_config

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "00.png").write_bytes((HAZELNUT / "colour" / "00.png").read_bytes())
    config = demo_config(inbox, HAZELNUT / "good", tmp_path / "out", port=0)
    config.redis.url = "redis://127.0.0.1:1/0"  # nothing listens there
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + 60
    while daemon.frames_done < 1 and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.05)
    daemon.request_stop()
    await task
    assert daemon.redis is None
    assert json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])["frame_id"] == "00.png"
