"""What the HTTP server and the admin API share: the app key holding the daemon, the admin token, loopback test.

``inspectd.daemon.http`` (which mounts the admin routes) and ``inspectd.daemon.admin`` both import these from
here, so ``admin`` never imports ``http`` and the two form no import cycle.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from inspectd.daemon.app import InspectDaemon

DAEMON_KEY: web.AppKey = web.AppKey("daemon", object)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(daemon: InspectDaemon) -> str | None:
    return daemon.config.http.token or os.environ.get("INSPECTD_ADMIN_TOKEN") or None
