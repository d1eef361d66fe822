"""OpenCV camera source (USB index, RTSP/HTTP URL or video file): captures in its own thread,
reconnects with bounded exponential backoff, and keeps only the newest frame(s) when the consumer lags."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from inspectd.streams.retry import Backoff
from inspectd.streams.schema import Frame

log = logging.getLogger(__name__)

POLICY_LATEST = "latest"
POLICY_QUEUE = "queue"
_LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass(frozen=True, slots=True)
class CameraConfig:
    """One capture device and how to treat it.

    ``uri``: an int (USB index), a URL, or a video file path. ``policy``: "latest" keeps only the newest
    frame; "queue" keeps up to ``queue_size`` (oldest dropped). A file ends: with ``loop`` it restarts at
    once; with ``reconnect`` the source waits (backoff) for the file to be replaced or re-created.
    """

    name: str
    uri: int | str
    product: str
    line: str
    policy: str = POLICY_LATEST
    queue_size: int = 8
    loop: bool = False
    reconnect: bool = True
    open_timeout_s: float = 5.0  # a stream that does not answer costs this camera this long, no other camera
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    max_fps: float | None = None  # pace the capture (e.g. a file played at camera speed)

    def __post_init__(self) -> None:
        if self.policy not in (POLICY_LATEST, POLICY_QUEUE):
            raise ValueError(f"policy must be {POLICY_LATEST!r} or {POLICY_QUEUE!r}, not {self.policy!r}")
        if self.queue_size < 1 or self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("queue_size >= 1 and 0 < backoff_initial_s <= backoff_max_s required")

    @property
    def is_file(self) -> bool:
        return isinstance(self.uri, str) and not self.uri.lower().startswith(_LIVE_SCHEMES)


def mask_credentials(uri: int | str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x`` (for log lines and metrics)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(uri))


def open_capture(uri: int | str, open_timeout_s: float, read_timeout_s: float) -> Any:
    """cv2.VideoCapture with explicit open and read timeouts (OpenCV's default is 30 s, and the opens of all
    cameras of a process wait for each other behind it)."""
    if isinstance(uri, int):
        return cv2.VideoCapture(uri)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)]
    return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _rate_limited(n: int) -> bool:
    """Log the 1st, 2nd, 3rd and then every 20th occurrence of a repeating error."""
    return n <= 3 or n % 20 == 0


def _describe(exc: BaseException) -> str:
    return mask_credentials(f"{type(exc).__name__}: {exc}".strip())


def _frame_problem(bgr: Any) -> str | None:
    """Why a frame a backend returned with ok=True cannot be used (None: it is fine)."""
    if not isinstance(bgr, np.ndarray):
        return f"not an array ({type(bgr).__name__})"
    if bgr.size == 0:
        return f"empty frame {bgr.shape}"
    if bgr.ndim == 2 or (bgr.ndim == 3 and bgr.shape[2] in (1, 3, 4)):
        return None
    return f"unsupported frame shape {bgr.shape}"


class CameraSource:
    """Frames from one camera; ``dropped``, ``frames_captured``, ``reconnects``, ``connected`` are counters
    for metrics, and ``on_drop(n)`` (called from the capture thread, or from the consumer for a frame that
    cannot be converted) reports drops as they happen.

    ``capture_errors`` counts exceptions raised by the capture backend (open, read, grab, retrieve); each one
    ends that stream like a read failure (reconnect with backoff, or the end of a source without reconnect)
    and leaves its message in ``last_error``. ``bad_frames`` counts unusable frames (empty, odd shape, not
    convertible); they are skipped and counted in ``dropped`` too."""

    def __init__(
        self,
        config: CameraConfig,
        *,
        on_drop: Callable[[int], None] | None = None,
        capture_factory: Callable[[int | str], Any] | None = None,
    ) -> None:
        self.config = config
        self.on_drop = on_drop
        self._factory = capture_factory or (
            lambda uri: open_capture(uri, config.open_timeout_s, config.read_timeout_s))
        # frame ids are <name>-<start time ms>-<seq>: unique across restarts (de-duplication keys on them)
        self.run_id = str(int(time.time() * 1000))
        self.failed_opens = 0
        self.throttled = 0  # live-stream frames skipped to honour max_fps (grabbed, never decoded)
        self.last_frame_at = 0.0  # monotonic time of the newest captured frame (0: none yet)
        self.source = f"camera:{config.name}"
        self.frames_captured = 0
        self.dropped = 0
        self.reconnects = 0
        self.connected = False
        self.finished = False  # the capture thread ended for good (file done, no loop/reconnect)
        self.last_error = ""
        self.capture_errors = 0  # exceptions from the capture backend (each ends the stream, like a read failure)
        self.bad_frames = 0  # unusable frames skipped (also counted in ``dropped``)
        maxlen = 1 if config.policy == POLICY_LATEST else config.queue_size
        self._buffer: deque[tuple[int, float, np.ndarray]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        with contextlib.suppress(RuntimeError):
            self._bind_loop()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.config.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._wake = loop, asyncio.Event()

    @property
    def exhausted(self) -> bool:
        """True once the capture ended for good and every buffered frame was read."""
        with self._lock:
            return self.finished and not self._buffer

    # -- consumer side --------------------------------------------------------------------------------

    def take(self, max_count: int) -> list[Frame]:
        """Up to ``max_count`` buffered frames, oldest first, without waiting. A frame that cannot be converted
        costs only itself (a counted drop), never the good frames taken with it."""
        with self._lock:
            raw = [self._buffer.popleft() for _ in range(min(max_count, len(self._buffer)))]
        frames = []
        for seq, ts, bgr in raw:
            try:
                frames.append(self._frame(seq, ts, bgr))
            except Exception as exc:  # noqa: BLE001 - one bad frame must not lose the others
                self._bad_frame(f"cannot convert frame {seq} {getattr(bgr, 'shape', '?')}: {_describe(exc)}")
        return frames

    async def read(self, max_count: int, timeout_s: float = 1.0) -> list[Frame]:
        """Up to ``max_count`` frames; waits up to ``timeout_s`` for the first one."""
        if self._thread is None:
            self.start()
        self._bind_loop()
        assert self._wake is not None
        deadline = time.monotonic() + timeout_s
        while True:
            self._wake.clear()
            frames = self.take(max_count)
            remaining = deadline - time.monotonic()
            if frames or remaining <= 0 or self.exhausted:
                return frames
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _frame(self, seq: int, ts: float, bgr: np.ndarray) -> Frame:
        cfg = self.config
        if bgr.ndim == 2 or bgr.shape[2] == 1:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        elif bgr.shape[2] == 4:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return Frame(product=cfg.product, line=cfg.line, frame_id=f"{cfg.name}-{self.run_id}-{seq}", captured_at=ts,
                     image=rgb, meta={"camera": cfg.name, "seq": seq}, source=self.source)

    # -- capture thread -------------------------------------------------------------------------------

    def _push(self, bgr: np.ndarray) -> None:
        with self._lock:
            self.frames_captured += 1
            dropped = len(self._buffer) == self._buffer.maxlen
            self._buffer.append((self.frames_captured, time.time(), bgr))  # evicts the oldest when full
            if dropped:
                self.dropped += 1
        if dropped:
            self._report_drop()
        self._notify()

    def _report_drop(self) -> None:
        if self.on_drop is not None:
            try:
                self.on_drop(1)
            except Exception:  # a metrics callback must not kill the capture
                log.exception("camera %s: on_drop callback failed", self.config.name)

    def _bad_frame(self, why: str) -> None:
        """An unusable frame: skipped, counted as a drop, logged (rate-limited)."""
        with self._lock:
            self.bad_frames += 1
            self.dropped += 1
            n = self.bad_frames
        if _rate_limited(n):
            log.warning("camera %s: dropped a bad frame (%s; %d so far)", self.config.name, why, n)
        self._report_drop()

    def _capture_error(self, stage: str, exc: Exception) -> None:
        """The capture backend raised: record it (``last_error``, ``capture_errors``) and log it, rate-limited,
        with the traceback the first time (instead of a thread that dies with it on stderr)."""
        self.capture_errors += 1
        self.last_error = f"{stage} raised {_describe(exc)}"
        if _rate_limited(self.capture_errors):
            log.warning("camera %s (%s): %s (error %d)", self.config.name, mask_credentials(self.config.uri),
                        self.last_error, self.capture_errors, exc_info=self.capture_errors == 1)

    def _release(self, cap: Any) -> None:
        if cap is None:
            return
        try:
            cap.release()
        except Exception as exc:  # noqa: BLE001 - a release that fails must not end the capture thread
            self._capture_error("release", exc)

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(wake.set)

    def _open(self) -> Any | None:
        cfg = self.config
        if cfg.is_file and not os.path.exists(str(cfg.uri)):
            self.last_error = f"{cfg.uri}: no such file"
            return None
        started = time.monotonic()
        cap, reason = None, ""
        try:
            cap = self._factory(cfg.uri)
            opened = cap is not None and bool(cap.isOpened())
        except Exception as exc:  # noqa: BLE001 - a backend that raises on open is a failed open, then a retry
            opened, reason = False, f" ({_describe(exc)})"
            self.capture_errors += 1
        if not opened:
            self._release(cap)
            self.failed_opens += 1
            self.last_error = f"{mask_credentials(cfg.uri)}: cannot open{reason}"
            if _rate_limited(self.failed_opens):  # one line per attempt, then rate-limited
                log.warning("camera %s (%s): cannot open%s (attempt %d, %.1f s; open_timeout_s %.1f)", cfg.name,
                            mask_credentials(cfg.uri), reason, self.failed_opens, time.monotonic() - started,
                            cfg.open_timeout_s)
            return None
        return cap

    def _run(self) -> None:
        cfg = self.config
        backoff = Backoff(cap=cfg.backoff_max_s, base=cfg.backoff_initial_s)  # the shared policy
        played: tuple[int, int, int] | None = None  # identity of a file played to its end
        ever_opened = False
        try:
            while not self._stop.is_set():
                if played is not None and _file_identity(str(cfg.uri)) in (None, played):
                    cap = None  # the same file again (or none yet): wait for a new one
                else:
                    cap = self._open()
                if cap is None:
                    if not cfg.reconnect:
                        break
                    self._stop.wait(backoff.next_delay())
                    continue
                identity = _file_identity(str(cfg.uri)) if cfg.is_file else None
                if ever_opened and not (cfg.is_file and cfg.loop):  # a looping file is no reconnect
                    self.reconnects += 1
                    log.info("camera %s: reconnected", cfg.name)
                ever_opened, played = True, None
                got, failed = self._capture(cap)
                if got:
                    backoff.reset()
                if self._stop.is_set():
                    break
                if cfg.is_file and cfg.loop and got:
                    if failed:  # a looping file that raised: replay it, but not in a tight loop
                        self._stop.wait(backoff.next_delay())
                    continue
                if not cfg.reconnect:
                    break
                if cfg.is_file:
                    played = identity
                delay = backoff.next_delay()
                log.warning("camera %s: stream ended (%s); retrying in %.2fs", cfg.name, self.last_error, delay)
                self._stop.wait(delay)
        except Exception as exc:  # a bug here: report it (log, last_error), not a traceback on stderr only
            self.capture_errors += 1
            self.last_error = f"capture thread failed: {_describe(exc)}"
            log.exception("camera %s: capture thread failed", cfg.name)
        finally:
            self.connected = False
            self.finished = True
            self._notify()

    def _capture(self, cap: Any) -> tuple[int, bool]:
        """Read frames until the stream ends or stop; returns how many were read, and whether the backend
        raised (recorded as a capture error; the stream then ends like a read failure)."""
        interval = 1.0 / self.config.max_fps if self.config.max_fps else 0.0
        count = 0
        failed = False
        self.connected = True
        live = not self.config.is_file
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    if interval and live:
                        # a live stream keeps coming whatever we do: grab every frame (cheap, no decode) and
                        # decode only at max_fps, so frames are dropped here instead of piling up in the socket
                        if not cap.grab():
                            self.last_error = "read failed"
                            break
                        if time.monotonic() < next_at:
                            self.throttled += 1
                            continue
                        ok, bgr = cap.retrieve()
                        next_at = max(next_at + interval, time.monotonic())
                    else:
                        ok, bgr = cap.read()
                except Exception as exc:  # noqa: BLE001 - e.g. cv2.error from a backend assertion
                    self._capture_error("read", exc)
                    failed = True
                    break
                if not ok or bgr is None:
                    self.last_error = "end of stream" if self.config.is_file else "read failed"
                    break
                problem = _frame_problem(bgr)
                if problem is not None:  # skipped here, so it never reaches (and breaks) a consumer's read
                    self._bad_frame(problem)
                    continue
                count += 1
                self.last_frame_at = time.monotonic()
                self._push(bgr)
                if interval and not live:  # a file: pace the playback at max_fps
                    next_at += interval
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            self.connected = False
            self._release(cap)
        return count, failed
