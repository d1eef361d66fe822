"""The daemon's HTTP server (aiohttp): /healthz, /readyz, /metrics, and the admin API routes.

Binds to 127.0.0.1 by default; bound anywhere else it refuses to start without a bearer token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from inspectd.daemon.admin import add_admin_routes
from inspectd.daemon.console import add_console_routes
from inspectd.daemon.http_common import (
    DAEMON_KEY,
    admin_token,
    default_token_file,
    host_allowed,
    is_loopback,
    load_or_create_token,
)
from inspectd.daemon.metrics import metrics_handler

if TYPE_CHECKING:
    from inspectd.daemon.app import InspectDaemon

log = logging.getLogger(__name__)

async def healthz(request: web.Request) -> web.Response:
    daemon: InspectDaemon = request.app[DAEMON_KEY]
    ok = daemon.healthy()
    return web.json_response({"status": "ok" if ok else "unhealthy"}, status=200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    daemon: InspectDaemon = request.app[DAEMON_KEY]
    checks = {"model_loaded": daemon.backbone is not None, "products_ready": daemon.ready()}
    cameras = daemon.cameras_live() if daemon.started else {}
    if cameras:
        checks["cameras"] = all(cameras.values())
    if daemon.redis is not None:
        try:
            checks["redis"] = bool(await daemon.redis.ping())
        except Exception:  # noqa: BLE001 - any failure means not ready
            checks["redis"] = False
    ok = all(checks.values())
    return web.json_response({"ready": ok, "checks": checks, "cameras": cameras,
                              "demo_weights": daemon.backbone.demo_weights if daemon.backbone else None},
                             status=200 if ok else 503)


@web.middleware
async def host_allow_list(request: web.Request, handler) -> web.StreamResponse:  # noqa: ANN001 - aiohttp handler
    """Refuse requests whose Host is not ours (DNS rebinding: a page on evil.example resolving to 127.0.0.1)."""
    daemon: InspectDaemon = request.app[DAEMON_KEY]
    cfg = daemon.config.http
    if not host_allowed(request.headers.get("Host", ""), cfg.host, cfg.allowed_hosts):
        log.warning("http: %s %s with Host %r refused (not in the allow-list)", request.method, request.path,
                    request.headers.get("Host"))
        return web.json_response({"error": f"Host {request.headers.get('Host')!r} not allowed (http.allowed_hosts)"},
                                 status=421)
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:  # noqa: ANN001 - aiohttp handler
    """An unexpected exception in a handler (a bug, a failing disk) is a JSON 500 that says where to look, logged
    with its traceback, instead of aiohttp's text/plain page that API clients cannot parse."""
    try:
        return await handler(request)
    except (web.HTTPException, ConnectionError):  # (a client gone mid-stream: nothing to answer)
        raise
    except Exception as exc:  # noqa: BLE001 - asyncio.CancelledError (a client gone) is no Exception and passes
        log.exception("http: %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error ({type(exc).__name__}); the daemon's log has the "
                                           "traceback"}, status=500)


def build_app(daemon: InspectDaemon) -> web.Application:
    app = web.Application(client_max_size=daemon.config.http.max_body_bytes, middlewares=[host_allow_list,
                                                                                           json_errors])
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler(daemon.metrics))
    add_admin_routes(app, daemon)
    if daemon.config.console.enabled:
        add_console_routes(app, daemon)
    return app


async def start_http(daemon: InspectDaemon) -> web.AppRunner:
    cfg = daemon.config.http
    if not is_loopback(cfg.host) and not admin_token(daemon):
        raise RuntimeError(f"http.host {cfg.host!r} is not loopback: set http.token or INSPECTD_ADMIN_TOKEN")
    if not admin_token(daemon):  # loopback, nothing configured: writes still need a token, made once into a file
        path = Path(cfg.token_file).expanduser() if cfg.token_file else default_token_file()
        daemon.generated_token = load_or_create_token(path)
        log.info("admin API writes need the token in %s (0600): curl -H \"Authorization: Bearer $(cat %s)\"",
                 path, path)
    runner = web.AppRunner(build_app(daemon), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    daemon.http_port = runner.addresses[0][1] if runner.addresses else cfg.port
    log.info("http on %s:%s (/healthz /readyz /metrics%s)", cfg.host, daemon.http_port,
             " /console" if daemon.config.console.enabled else "")
    return runner
