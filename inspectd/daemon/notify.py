"""systemd sd_notify without dependencies: READY/WATCHDOG/STOPPING/STATUS datagrams to ``$NOTIFY_SOCKET``.

Every call is a no-op (returning False) when the daemon does not run under systemd with Type=notify.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def _address() -> str | None:
    """The socket address from ``$NOTIFY_SOCKET``: a path, or '@name' for the abstract namespace."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.debug("NOTIFY_SOCKET %r is not a unix socket address; sd_notify disabled", value)
    return None  # e.g. vsock: addresses (VMs) are not supported here


def notify(message: str) -> bool:
    """Send one sd_notify datagram (newline-separated KEY=VALUE lines); True when it was sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # never waits: a receiver that stops reading (PID 1 stalled) fills its queue, and a blocking send would
            # then stall the event loop, scoring included; a ping dropped then costs nothing
            sock.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT, address)
    except OSError as exc:  # systemd gone, socket unreachable or its queue full: never fatal for the daemon
        log.debug("sd_notify %r failed: %s", message, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text.replace(chr(10), ' ')}")


def extend_timeout(seconds: float) -> bool:
    """Ask systemd for more time to start/stop (e.g. slow model loading): EXTEND_TIMEOUT_USEC."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is armed for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog belongs to another process (e.g. our parent)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None


async def watchdog_loop(is_healthy: Callable[[], bool], interval: float | None = None) -> None:
    """Ping WATCHDOG=1 every ``interval`` (default: watchdog_interval()) while ``is_healthy()``; returns at once
    when no watchdog is armed. An unhealthy daemon stops pinging, so systemd kills and restarts it."""
    interval = watchdog_interval() if interval is None else interval
    if not interval or _address() is None:
        return
    while True:
        if is_healthy():
            watchdog()
        else:
            log.warning("unhealthy: withholding the systemd watchdog ping")
        await asyncio.sleep(interval)
