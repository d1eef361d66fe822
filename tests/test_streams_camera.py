"""Camera source over real video files written with OpenCV: order, BGR->RGB, reconnect, drop policies."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.streams.camera import CameraConfig, CameraSource
from inspectd.streams.schema import Frame

W, H = 64, 48


def write_video(path: Path, n: int, level0: int = 0) -> None:
    """n frames; frame i is pure blue (BGR channel 0) at level ``level0 + 8*i``."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))
    assert writer.isOpened()
    for i in range(n):
        bgr = np.zeros((H, W, 3), np.uint8)
        bgr[:, :, 0] = level0 + 8 * i
        writer.write(bgr)
    writer.release()


async def collect(src: CameraSource, n: int, timeout_s: float = 5.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while len(frames) < n and time.monotonic() < deadline:
        frames += await src.read(n - len(frames), timeout_s=0.2)
    return frames


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def cfg(path: Path, **kw: object) -> CameraConfig:
    base: dict[str, object] = dict(name="cam", uri=str(path), product="bottle", line="l1",
                                   backoff_initial_s=0.02, backoff_max_s=0.1)
    base.update(kw)
    return CameraConfig(**base)  # type: ignore[arg-type]


async def test_reads_file_in_order_as_rgb(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 10)
    src = CameraSource(cfg(video, policy="queue", queue_size=100, reconnect=False))
    frames = await collect(src, 10)
    await wait_for(lambda: src.exhausted)
    src.stop()
    run_id = frames[0].frame_id.split("-")[1]  # <name>-<start ms>-<seq>: unique across restarts
    assert [f.frame_id for f in frames] == [f"cam-{run_id}-{i}" for i in range(1, 11)]
    f = frames[-1]
    assert (f.product, f.line, f.source) == ("bottle", "l1", "camera:cam")
    assert f.image is not None and f.image.shape == (H, W, 3) and f.image.dtype == np.uint8
    mean = f.image.reshape(-1, 3).mean(axis=0)
    assert abs(mean[2] - 72) < 6 and mean[0] < 6  # blue ends up in the RGB "B" (last) channel
    assert src.dropped == 0 and src.frames_captured == 10


async def test_reconnects_when_file_is_removed_and_recreated(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 6)
    src = CameraSource(cfg(video, policy="queue", queue_size=100))
    first = await collect(src, 6)
    assert len(first) == 6
    video.unlink()
    await asyncio.sleep(0.3)
    assert await src.read(10, timeout_s=0.1) == []  # gone: waiting, with backoff
    assert not src.finished and not src.connected
    write_video(video, 4, level0=100)
    second = await collect(src, 4)
    src.stop()
    assert [f.frame_id.rsplit("-", 1)[1] for f in second] == [str(i) for i in range(7, 11)]
    assert second[0].image is not None and abs(second[0].image[..., 2].mean() - 100) < 6
    assert src.reconnects >= 1


async def test_unchanged_file_is_not_replayed_but_loop_replays(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 3)
    src = CameraSource(cfg(video, policy="queue", queue_size=100))
    assert len(await collect(src, 3)) == 3
    assert await collect(src, 1, timeout_s=0.3) == []  # same file: no replay
    src.stop()
    looping = CameraSource(cfg(video, policy="queue", queue_size=100, loop=True, max_fps=200))
    frames = await collect(looping, 7)
    looping.stop()
    assert len(frames) == 7 and looping.reconnects == 0  # a looping file is not a reconnect (it was counted)
    assert len({f.frame_id for f in frames}) == 7  # ids keep counting across loops


async def test_a_camera_that_never_answers_costs_only_itself_and_says_so(tmp_path: Path, caplog) -> None:
    """A port that accepts and never answers (a hung IP camera) beside a healthy camera: the healthy one delivers
    at once, the silent one gives up after open_timeout_s with one log line naming it, credentials masked."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_ignore() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_ignore, daemon=True)
    thread.start()
    caplog.set_level("WARNING", logger="inspectd.streams.camera")
    silent = CameraSource(cfg(f"rtsp://op:secret@127.0.0.1:{port}/line1", open_timeout_s=1.0, read_timeout_s=1.0,
                              reconnect=True, backoff_initial_s=5.0, backoff_max_s=5.0))
    video = tmp_path / "v.avi"
    write_video(video, 5)
    healthy = CameraSource(cfg(video, policy="queue", queue_size=100))
    started = time.monotonic()
    silent.start()
    try:
        frames = await collect(healthy, 5)
        took = time.monotonic() - started
        assert len(frames) == 5 and took < 3.0, took  # not behind the silent camera's open
        deadline = time.monotonic() + 10
        while silent.failed_opens == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert silent.failed_opens == 1 and time.monotonic() - started < 8
        lines = [r.getMessage() for r in caplog.records if "cannot open" in r.getMessage()]
        assert lines and "op:***@127.0.0.1" in lines[0] and "secret" not in lines[0]
    finally:
        healthy.stop()
        silent.stop(timeout_s=3)
        stop.set()
        server.close()
        for conn in accepted:
            conn.close()


async def test_missing_source_without_reconnect_finishes(tmp_path: Path) -> None:
    src = CameraSource(cfg(tmp_path / "none.avi", reconnect=False))
    assert await src.read(1, timeout_s=2) == []
    await wait_for(lambda: src.finished)
    assert "no such file" in src.last_error


@pytest.mark.parametrize(("policy", "kept"), [("latest", 1), ("queue", 4)])
async def test_slow_consumer_keeps_newest_and_counts_drops(tmp_path: Path, policy: str, kept: int) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 30)
    drops: list[int] = []
    src = CameraSource(cfg(video, policy=policy, queue_size=4, reconnect=False), on_drop=drops.append)
    src.start()
    await wait_for(lambda: src.finished)  # the consumer is slower than the capture
    frames = await src.read(10, timeout_s=0.1)
    assert [f.frame_id.rsplit("-", 1)[1] for f in frames] == [str(i) for i in range(31 - kept, 31)]
    assert src.dropped == 30 - kept == sum(drops)
    assert src.exhausted


async def test_a_video_file_played_to_its_end_reads_disconnected_but_keeps_readiness(tmp_path: Path) -> None:
    """inspectd_camera_connected kept its last value (1) once the file ended: the daemon stopped refreshing a
    finished source's metrics. It reads 0 now, and the finished file still does not count as a camera down."""
    from inspectd.daemon.app import InspectDaemon
    from inspectd.daemon.config import parse_config

    video = tmp_path / "v.avi"
    write_video(video, 5)
    src = CameraSource(cfg(video, policy="queue", queue_size=100, reconnect=False))
    daemon = InspectDaemon(parse_config({"model": {"device": "cpu"}, "sources": {"redis": False},
                                         "sinks": {"redis": False}, "redis": {"control_stream": None}}))
    daemon.sources = [src]
    try:
        frames = await src.read(2, timeout_s=5)
        assert frames and src.connected
        daemon.cameras_live()
        assert 'inspectd_camera_connected{camera="cam"} 1.0' in daemon.metrics.exposition().decode()
        await wait_for(lambda: src.finished)
        assert daemon.cameras_live() == {}  # done, not down
        assert 'inspectd_camera_connected{camera="cam"} 0.0' in daemon.metrics.exposition().decode()
    finally:
        src.stop()


class FaultyCapture:
    """A real cv2.VideoCapture on a real file, with the faults a backend shows in the field injected: ``read()``
    raises cv2.error (as FFmpeg/GStreamer assertions do) once ``raise_after`` frames were read, and ``bad`` maps a
    read number to a frame handed back with ok=True instead of the next real one (which is kept for later)."""

    def __init__(self, path: str, raise_after: int | None = None, bad: dict[int, np.ndarray] | None = None) -> None:
        self.cap = cv2.VideoCapture(path)
        self.raise_after, self.bad, self.reads, self.good = raise_after, bad or {}, 0, 0

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.cap.isOpened()

    def release(self) -> None:
        self.cap.release()

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        if self.reads in self.bad:
            return True, self.bad[self.reads]
        if self.raise_after is not None and self.good >= self.raise_after:
            raise cv2.error("OpenCV(4.x) cap_ffmpeg_impl.hpp:1591: error: (-215:Assertion failed) in 'retrieveFrame'")
        ok, bgr = self.cap.read()
        self.good += ok
        return ok, bgr


@pytest.fixture
def thread_crashes(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """Exceptions that escaped a thread (the capture thread must not die with a traceback on stderr)."""
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    return seen


async def test_a_capture_error_on_a_live_camera_reconnects_and_keeps_delivering(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_crashes: list) -> None:
    """cv2.error from read() after 3 frames: the camera (reconnect on) reopens and goes on delivering, and is
    never ``finished`` (the daemon would take it for a file played to its end, with readiness green)."""
    video = tmp_path / "v.avi"
    write_video(video, 10)
    opens: list[FaultyCapture] = []

    def factory(uri: int | str) -> FaultyCapture:
        assert uri == "rtsp://op:secret@cam/1"
        opens.append(FaultyCapture(str(video), raise_after=3 if not opens else None))
        return opens[-1]

    caplog.set_level("WARNING", logger="inspectd.streams.camera")
    src = CameraSource(cfg("rtsp://op:secret@cam/1", policy="queue", queue_size=100), capture_factory=factory)
    try:
        frames = await collect(src, 3 + 10)
        assert len(frames) == 13 and len(opens) >= 2  # 3 before the error, then the whole stream once reopened
        assert not src.finished and not src.exhausted
        assert src._thread is not None and src._thread.is_alive()
        assert src.reconnects >= 1 and src.capture_errors == 1
        assert [int(f.frame_id.rsplit("-", 1)[1]) for f in frames] == list(range(1, 14))
        assert abs(frames[3].image[..., 2].mean() - 0) < 6 and abs(frames[-1].image[..., 2].mean() - 72) < 6
        more = await collect(src, 5)  # and it keeps going
        assert len(more) == 5 and not src.finished
        # the daemon's camera metrics show it (what an operator's alert reads)
        from prometheus_client import generate_latest

        from inspectd.daemon.app import InspectDaemon
        from inspectd.daemon.config import parse_config

        daemon = InspectDaemon(parse_config({"model": {"device": "cpu"}, "sources": {"redis": False},
                                             "sinks": {"redis": False}, "redis": {"control_stream": None}}))
        daemon.sources = [src]
        daemon.cameras_live()
        text = generate_latest(daemon.metrics.registry).decode()
        assert 'inspectd_camera_capture_errors{camera="cam"} 1.0' in text
    finally:
        src.stop()
    lines = [r.getMessage() for r in caplog.records if "Assertion failed" in r.getMessage()]
    assert lines and "op:***@cam" in lines[0] and "secret" not in " ".join(lines)
    assert thread_crashes == []


async def test_a_capture_error_on_a_file_without_reconnect_ends_it_with_the_error_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_crashes: list) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 10)
    caplog.set_level("WARNING", logger="inspectd.streams.camera")
    src = CameraSource(cfg(video, policy="queue", queue_size=100, reconnect=False),
                       capture_factory=lambda uri: FaultyCapture(str(uri), raise_after=4))
    frames = await collect(src, 10, timeout_s=2.0)
    await wait_for(lambda: src.exhausted)
    src.stop()
    assert len(frames) == 4 and src.frames_captured == 4
    assert "raised" in src.last_error and "Assertion failed" in src.last_error  # not a silent "end of stream"
    assert src.capture_errors == 1
    assert any("Assertion failed" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert thread_crashes == []


async def test_an_open_that_raises_is_a_failed_open_and_is_retried(tmp_path: Path, thread_crashes: list) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 5)
    calls: list[int | str] = []

    def factory(uri: int | str) -> FaultyCapture:
        calls.append(uri)
        if len(calls) <= 2:
            raise cv2.error("OpenCV(4.x) cap.cpp:166: error: (-215:Assertion failed) in 'open'")
        return FaultyCapture(str(video))

    src = CameraSource(cfg("rtsp://cam/1", policy="queue", queue_size=100), capture_factory=factory)
    try:
        frames = await collect(src, 5)
        assert len(frames) == 5 and not src.finished
        assert src.failed_opens == 2 and src.capture_errors == 2
    finally:
        src.stop()
    assert thread_crashes == []


async def test_a_bad_frame_costs_only_itself_and_is_counted_as_a_drop(tmp_path: Path, caplog) -> None:
    """An empty frame, a 2-channel frame (both caught before the buffer) and one cvtColor cannot convert (caught
    when taken) among 10 good ones: one read() returns all 10 good frames, the 3 bad ones are counted drops."""
    video = tmp_path / "v.avi"
    write_video(video, 10)
    bad = {3: np.zeros((0, 0, 3), np.uint8), 6: np.zeros((H, W, 2), np.uint8), 9: np.zeros((H, W, 3), np.int64)}
    drops: list[int] = []
    caplog.set_level("WARNING", logger="inspectd.streams.camera")
    src = CameraSource(cfg(video, policy="queue", queue_size=100, reconnect=False), on_drop=drops.append,
                       capture_factory=lambda uri: FaultyCapture(str(uri), bad=bad))
    src.start()
    await wait_for(lambda: src.finished)  # everything is buffered: the bad frame is taken with the good ones
    frames = await src.read(20, timeout_s=0.1)
    src.stop()
    levels = [round(float(f.image[..., 2].mean()) / 8) for f in frames if f.image is not None]
    assert len(frames) == 10 and levels == list(range(10))  # every good frame, in order
    assert src.dropped == 3 == sum(drops) and src.bad_frames == 3
    assert src.exhausted and src.capture_errors == 0
    assert len([r for r in caplog.records if "bad frame" in r.getMessage()]) == 3


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        CameraConfig(name="c", uri=0, product="p", line="l", policy="newest")
    assert not CameraConfig(name="c", uri="rtsp://cam/1", product="p", line="l").is_file
    assert CameraConfig(name="c", uri="/data/a.mp4", product="p", line="l").is_file


async def test_camera_health_is_in_metrics_and_readiness(tmp_path: Path, tiny_backbone) -> None:
    """A camera whose stream stops: /readyz says cameras false once it has been silent for camera_stale_s, the
    metrics show it disconnected with its frame count and silence; when the stream returns it is ready again."""
    import shutil

    import aiohttp

    from inspectd.daemon.app import InspectDaemon
    from inspectd.daemon.config import parse_config

    video = tmp_path / "cam.avi"
    write_video(video, 5)
    config = parse_config({
        "model": {"device": "cpu"}, "http": {"enabled": True, "port": 0},
        "sources": {"redis": False, "camera_stale_s": 0.6,
                    "cameras": [{"name": "door", "uri": str(video), "product": "grid", "line": "l1",
                                 "policy": "queue", "backoff_initial_s": 0.05, "backoff_max_s": 0.1}]},
        "sinks": {"redis": False, "jsonl": str(tmp_path / "out.jsonl")},
        "products": [{"id": "grid", "object_name": "grid", "shots": 0, "mask": "none"}],
        "registry": {"watch": False}, "redis": {"control_stream": None}})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}") as session:
            deadline = time.monotonic() + 10
            while daemon.frames_done < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            video.unlink()  # the camera's stream is gone
            await asyncio.sleep(1.0)
            async with session.get("/readyz") as response:
                body = await response.json()
            assert response.status == 503 and body["checks"]["cameras"] is False and body["cameras"] == {
                "door": False}
            async with session.get("/metrics") as response:
                text = await response.text()
            assert 'inspectd_camera_connected{camera="door"} 0.0' in text
            assert 'inspectd_camera_frames_captured{camera="door"} 5.0' in text
            silence = float(text.split('inspectd_camera_seconds_since_frame{camera="door"} ')[1].split()[0])
            assert silence >= 0.6
            write_video(tmp_path / "new.avi", 5, level0=40)
            shutil.move(tmp_path / "new.avi", video)  # the stream is back
            deadline = time.monotonic() + 10
            ready = False
            while not ready and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                async with session.get("/readyz") as response:
                    ready = response.status == 200
            assert ready
    finally:
        await daemon.shutdown()


async def test_shutdown_with_stuck_cameras_honours_its_limit(tmp_path: Path, tiny_backbone) -> None:
    """Three cameras stuck opening a stream that never answers: shutdown takes shutdown_timeout_s once, not 5 s
    per camera (24.7 s against a 20 s limit before)."""
    import socket

    from inspectd.daemon.app import InspectDaemon
    from inspectd.daemon.config import parse_config

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    cameras = [{"name": f"cam{i}", "uri": f"rtsp://127.0.0.1:{port}/s{i}", "product": "grid", "line": "l1",
                "open_timeout_s": 30.0, "read_timeout_s": 30.0} for i in range(3)]
    config = parse_config({
        "model": {"device": "cpu"}, "http": {"enabled": False}, "shutdown_timeout_s": 1.5,
        "sources": {"redis": False, "cameras": cameras},
        "sinks": {"redis": False, "jsonl": str(tmp_path / "out.jsonl")},
        "products": [{"id": "grid", "object_name": "grid", "shots": 0, "mask": "none"}],
        "registry": {"watch": False}, "redis": {"control_stream": None}})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    try:
        await daemon.start()
        await asyncio.sleep(0.5)  # every camera is inside its (30 s) open now
        started = time.monotonic()
        await daemon.shutdown()
        took = time.monotonic() - started
    finally:
        server.close()
    assert took < 1.5 + 1.0, f"shutdown took {took:.1f} s against shutdown_timeout_s 1.5"


def _mjpeg_server(fps: float):  # noqa: ANN202 - (server, url, counter)
    """A live HTTP MJPEG camera on loopback: frame i is grey level i % 250, sent at ``fps``."""
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    counter = {"sent": 0}

    class Camera(BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002, ANN201
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                while True:
                    buffer = io.BytesIO()
                    level = counter["sent"] % 250
                    Image.fromarray(np.full((48, 64, 3), level, np.uint8)).save(buffer, format="JPEG", quality=95)
                    data = buffer.getvalue()
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                    counter["sent"] += 1
                    time.sleep(1.0 / fps)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Camera)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg", counter


async def test_max_fps_on_a_live_stream_drops_instead_of_building_a_backlog() -> None:
    server, url, counter = _mjpeg_server(fps=50)
    source = CameraSource(CameraConfig(name="live", uri=url, product="p", line="l", policy="latest", max_fps=5))
    source.start()
    try:
        await asyncio.sleep(2.5)
        frames = source.take(10)
        assert len(frames) == 1  # keep-newest: memory bounded to one frame
        newest_level = int(frames[0].image[..., 0].mean().round())
        lag = (counter["sent"] % 250) - newest_level
        assert 0 <= lag <= 15, f"the newest frame is {lag} frames behind the camera (a backlog)"
        assert source.throttled > 60 and source.frames_captured <= 20  # skipped at the source, not queued
    finally:
        source.stop()
        server.shutdown()


async def test_a_slow_engine_keeps_the_newest_camera_frame_counts_drops_and_latency_stays_bounded(
        tmp_path: Path, tiny_backbone) -> None:
    import json

    import tests.slow_detector  # noqa: F401 - registers "test-slow" (scoring sleeps)
    from inspectd.daemon.app import InspectDaemon
    from inspectd.daemon.config import parse_config

    server, url, _counter = _mjpeg_server(fps=40)
    out = tmp_path / "out.jsonl"
    config = parse_config({
        "model": {"device": "cpu"}, "http": {"enabled": False},
        "batcher": {"max_batch_size": 1, "max_delay_ms": 0, "queue_size": 4},
        "sources": {"redis": False, "cameras": [{"name": "live", "uri": url, "product": "slow", "line": "l1",
                                                   "policy": "latest"}]},
        "sinks": {"redis": False, "jsonl": str(out)},
        "products": [{"id": "slow", "detector": "test-slow", "shots": 0, "mask": "none",
                      "options": {"sleep_s": 0.25}}],
        "registry": {"watch": False}, "redis": {"control_stream": None}})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        await asyncio.sleep(3.0)
        camera = next(s for s in daemon.sources if hasattr(s, "last_frame_at"))
        assert len(camera._buffer) <= 1  # memory bounded: keep-newest
        assert camera.dropped > 20  # the engine scores ~4 frames/s of 40: the rest are counted drops
        text = daemon.metrics.exposition().decode()
        dropped = float(text.split('inspectd_camera_frames_dropped_total{source="live"} ')[1].split()[0])
        assert dropped == camera.dropped
    finally:
        await daemon.shutdown()
        server.shutdown()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    captured = sorted(r["ts"] for r in records if r.get("kind") == "result")
    assert len(captured) >= 5
    gaps = np.diff(captured)
    # each scored frame is the newest one when the engine gets free (~0.25 s later), not the next of a backlog of
    # frames 25 ms apart; so the latency stays one scoring time instead of growing
    assert float(np.median(gaps)) > 0.15, gaps
