"""sd_notify: datagrams reach a real AF_UNIX socket (path and abstract), watchdog pings only while healthy."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from inspectd.daemon import notify


def _recv_all(sock: socket.socket) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:  # sun_path limit; keep the test honest rather than skipping
        path = Path("/tmp") / f"inspectd-notify-{uuid.uuid4().hex[:8]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()
    path.unlink(missing_ok=True)


def test_ready_watchdog_stopping_status_reach_the_socket(path_socket: socket.socket) -> None:
    assert notify.ready()
    assert notify.watchdog()
    assert notify.status("scoring 3 products\nok")
    assert notify.stopping()
    assert _recv_all(path_socket) == ["READY=1", "WATCHDOG=1", "STATUS=scoring 3 products ok", "STOPPING=1"]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"inspectd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert notify.ready()
        assert notify.watchdog()
        assert _recv_all(sock) == ["READY=1", "WATCHDOG=1"]
    finally:
        sock.close()


def test_no_op_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.ready() is False
    assert notify.watchdog() is False
    assert notify.watchdog_interval() is None


def test_missing_socket_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # armed for another process
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert notify.watchdog_interval() is None


async def test_watchdog_loop_pings_only_while_healthy(path_socket: socket.socket,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    healthy = True
    task = asyncio.create_task(notify.watchdog_loop(lambda: healthy))
    await asyncio.sleep(0.1)
    pings = _recv_all(path_socket)
    assert pings and set(pings) == {"WATCHDOG=1"}
    healthy = False
    await asyncio.sleep(0.03)  # let a ping already decided drain
    _recv_all(path_socket)
    await asyncio.sleep(0.1)
    assert _recv_all(path_socket) == []
    healthy = True
    await asyncio.sleep(0.05)
    assert "WATCHDOG=1" in _recv_all(path_socket)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_loop_returns_when_unarmed(path_socket: socket.socket,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(notify.watchdog_loop(lambda: True), timeout=1.0)
    assert _recv_all(path_socket) == []


def test_a_receiver_that_stops_reading_never_blocks_the_sender(path_socket: socket.socket) -> None:
    import threading

    sent: list[bool] = []
    worker = threading.Thread(target=lambda: sent.extend(notify.watchdog() for _ in range(5000)), daemon=True)
    worker.start()  # nobody reads path_socket: its queue fills after a few hundred datagrams at most
    worker.join(5.0)
    assert not worker.is_alive(), "sd_notify blocked on a full notify socket (the event loop would stall)"
    assert sent[0] is True and sent[-1] is False  # the first pings went out, the ones that found it full dropped
