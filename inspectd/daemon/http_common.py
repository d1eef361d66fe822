"""What the HTTP server and the admin API share: the app key holding the daemon, the admin token (configured,
from the environment, or generated once into a 0600 file), the loopback test and the Host allow-list.

``inspectd.daemon.http`` (which mounts the admin routes) and ``inspectd.daemon.admin`` both import these from
here, so ``admin`` never imports ``http`` and the two form no import cycle.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import secrets
import time
from pathlib import Path
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


TOKEN_ENV = "INSPECTD_ADMIN_TOKEN"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def admin_token(daemon: InspectDaemon) -> str | None:
    return daemon.config.http.token or os.environ.get(TOKEN_ENV) or getattr(daemon, "generated_token", None)


def default_token_file() -> Path:
    """Where a generated admin token lives: systemd's $STATE_DIRECTORY, else $XDG_STATE_HOME/inspectd, else
    ~/.local/state/inspectd (the same place `curl -H "Authorization: Bearer $(cat FILE)"` reads it from)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "admin-token"
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "inspectd" / "admin-token"


def load_or_create_token(path: Path) -> str:
    """The token in ``path``, created (random, mode 0600, never world-readable) on first use."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another instance created it meanwhile
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def host_allowed(host_header: str, bind_host: str, allowed: tuple[str, ...] | list[str]) -> bool:
    """Host allow-list against DNS rebinding: on a loopback bind only loopback names (or ``allowed``) may be
    the request's Host; on another bind any Host unless ``allowed`` is given."""
    name = host_header.rsplit(":", 1)[0] if not host_header.startswith("[") else host_header.split("]")[0] + "]"
    name = name.lower()
    if allowed and name in {a.lower() for a in allowed}:
        return True
    if is_loopback(bind_host):
        return name in LOOPBACK_NAMES
    return not allowed


def reads_open(daemon: InspectDaemon) -> bool:
    """Reads on a loopback bind are open unless the operator configured a token (admin API and console alike)."""
    configured = daemon.config.http.token or os.environ.get(TOKEN_ENV)
    return not configured and is_loopback(daemon.config.http.host)


def foreign_origin(request: web.Request, daemon: InspectDaemon) -> str | None:
    """The request's Origin when it names a host not ours (a cross-site request from a web page), else None."""
    origin = request.headers.get("Origin")
    if origin and not host_allowed(origin.split("://", 1)[-1], daemon.config.http.host,
                                   daemon.config.http.allowed_hosts):
        return origin
    return None


def bearer_matches(request: web.Request, token: str | None) -> bool:
    """``Authorization: Bearer <token>`` with the right token (constant-time compare); False without a token."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def client_address(request: web.BaseRequest) -> str:
    """Who ``request`` comes from, as every per-client limit counts clients (`GuessLimiter`, the console's live
    feed): the TCP peer, "" when there is none; when the peer is one of ``http.trusted_proxies``, the client its
    ``X-Forwarded-For`` names (the rightmost address no trusted proxy added: what a client writes itself into the
    header is to the left of it, so it cannot choose its own identity). An untrusted peer's header is ignored."""
    peer = request.remote or ""
    daemon = request.app.get(DAEMON_KEY) if hasattr(request, "app") else None
    proxies = _networks(tuple(daemon.config.http.trusted_proxies)) if daemon is not None else ()
    if not proxies or not _in(peer, proxies):
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    for hop in reversed(hops):
        if not _in(hop, proxies):
            return hop if _address(hop) is not None else peer  # (a malformed hop: the proxy is all that is known)
    return hops[0] if hops else peer


@functools.lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in(text: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in networks)


class GuessLimiter:
    """Failed token checks (admin API bearer, console sign-in and bearer) per client address and overall, as token
    buckets: a client may fail ``per_client`` times at once, then once per ``client_refill_s``; all clients together
    ``overall`` times, then ``overall_per_s`` a second. A per-request delay alone does not slow guesses sent in
    parallel; this does (a weak configured ``http.token`` reachable off loopback)."""

    def __init__(self, per_client: int = 30, client_refill_s: float = 1.0, overall: int = 100,
                 overall_per_s: float = 5.0, clients: int = 4096) -> None:
        self.per_client, self.client_rate = per_client, 1.0 / client_refill_s
        self.overall, self.overall_rate = overall, overall_per_s
        self.max_clients = clients
        self._clients: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)
        self._all = (float(overall), time.monotonic())
        self.refused = 0

    @staticmethod
    def _level(bucket: tuple[float, float], capacity: float, rate: float, now: float) -> float:
        tokens, when = bucket
        return min(capacity, tokens + (now - when) * rate)

    def retry_after(self, client: str | None) -> float:
        """Seconds until ``client`` may try a token again (0: now)."""
        now = time.monotonic()
        waits = [0.0]
        overall = self._level(self._all, self.overall, self.overall_rate, now)
        if overall < 1:
            waits.append((1 - overall) / self.overall_rate)
        bucket = self._clients.get(client or "")
        if bucket is not None:
            level = self._level(bucket, self.per_client, self.client_rate, now)
            if level < 1:
                waits.append((1 - level) / self.client_rate)
        wait = max(waits)
        if wait > 0:
            self.refused += 1
        return wait

    def failed(self, client: str | None) -> None:
        now = time.monotonic()
        key = client or ""
        self._all = (self._level(self._all, self.overall, self.overall_rate, now) - 1, now)
        if key not in self._clients and len(self._clients) >= self.max_clients:
            self._clients.pop(next(iter(self._clients)))  # bounded: the oldest address is forgotten
        bucket = self._clients.pop(key, (float(self.per_client), now))
        self._clients[key] = (self._level(bucket, self.per_client, self.client_rate, now) - 1, now)


def guess_limiter(daemon: InspectDaemon) -> GuessLimiter:
    """The daemon's one `GuessLimiter` (the admin API and the console share it)."""
    limiter = getattr(daemon, "guess_limiter", None)
    if limiter is None:
        limiter = daemon.guess_limiter = GuessLimiter()  # type: ignore[attr-defined]
    return limiter
