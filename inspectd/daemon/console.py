"""The operator console's HTTP side: the page under /console, its JSON API, live updates (Server-Sent Events)
and browser sessions.

Auth follows the admin API's rules: reads on a loopback bind without a configured token are open, everything
else needs proof. A browser proves it once: the operator pastes the admin token into the sign-in form (POST
body, never a URL, never logged) and gets an HttpOnly, SameSite=Strict session cookie plus a CSRF token the
page keeps in memory; every write needs the cookie *and* the CSRF header (a script may send the bearer token
instead), and a foreign Origin is refused. Pages are framed by no one (clickjacking) and load nothing remote.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from redis.exceptions import RedisError

from inspectd.daemon.feedback import DEFECT, FALSE_ALARM, FeedbackError
from inspectd.daemon.http_common import (
    DAEMON_KEY,
    TOKEN_ENV,
    admin_token,
    bearer_matches,
    client_address,
    default_token_file,
    foreign_origin,
    guess_limiter,
    reads_open,
)

if TYPE_CHECKING:
    from inspectd.daemon.app import InspectDaemon

log = logging.getLogger(__name__)

COOKIE = "inspectd_console"
CSRF_HEADER = "X-CSRF-Token"
STATIC_FILES = {"index.html": "text/html", "console.js": "text/javascript", "console.css": "text/css"}
PICTURES = {"thumb.jpg": ("thumb_jpeg", "image/jpeg"), "overlay.jpg": ("overlay_jpeg", "image/jpeg"),
            "mask.png": ("mask_png", "image/png"), "image.png": ("image_png", "image/png")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",  # no other site may embed the pictures (or probe for them)
}
KEEP_ALIVE_S = 15.0
MAX_SESSIONS = 256
MAX_LIVE_STREAMS = 64  # open live-feed connections, all clients together
MAX_LIVE_STREAMS_PER_CLIENT = 4  # of those, from one client (`client_address`, as `GuessLimiter` counts): a tab
#                                  or script that keeps opening streams cannot lock other operators out
LIVE_CHECK_S = 1.0  # a quiet stream looks this often whether its client went away (and frees its slot)
LIVE_UNACKED_MS = 30_000  # a stream whose data its client has not acknowledged for this long is dropped (a phone
#                           that left the Wi-Fi sends no FIN: without this its slot stays taken ~15 min, TCP's own)
REFUSAL_LOG_S = 60.0  # refused live-feed connections are logged at most this often


class ConsoleError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    csrf: str
    expires: float


class Sessions:
    """Browser sessions in memory (a restart signs everyone out): id -> CSRF token and expiry."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._by_id: dict[str, Session] = {}

    def create(self) -> tuple[str, Session]:
        now = time.time()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
        while len(self._by_id) >= MAX_SESSIONS:  # oldest first out
            self._by_id.pop(min(self._by_id, key=lambda k: self._by_id[k].expires))
        session_id, session = secrets.token_urlsafe(32), Session(secrets.token_urlsafe(32), now + self.ttl_s)
        self._by_id[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is None or session.expires <= time.time():
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        self._by_id.pop(session_id or "", None)


SESSIONS_KEY: web.AppKey = web.AppKey("console_sessions", Sessions)


class LiveStreams:
    """Open live-feed streams, counted per client and overall: a client may hold ``per_client`` of them, all
    clients together ``overall``."""

    def __init__(self, overall: int = MAX_LIVE_STREAMS, per_client: int = MAX_LIVE_STREAMS_PER_CLIENT) -> None:
        self.overall, self.per_client = overall, per_client
        self.total = 0
        self.by_client: dict[str, int] = {}  # clients with a stream open (at most ``overall`` of them)
        self.refused = 0
        self._logged = -REFUSAL_LOG_S

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """Hold a slot for one of ``client``'s streams while the block runs, else `ConsoleError` 429 (the client
        has its ``per_client`` open) or 503 (all slots taken). Checked and counted with no await in between, so
        parallel requests cannot all pass the check, and given back however the block ends (the stream ends,
        the client goes away, an error, a cancellation); a refused request takes nothing."""
        held = self.by_client.get(client, 0)
        if held >= self.per_client:
            self._refuse(client, "its per-client limit")
            raise ConsoleError(429, f"too many live-feed connections from this client ({held} open, at most "
                                    f"{self.per_client} per client): close another console tab first")
        if self.total >= self.overall:
            self._refuse(client, "the overall limit")
            raise ConsoleError(503, f"too many live-feed connections (max {self.overall}, all clients together); "
                                    "try again later")
        self.total += 1
        self.by_client[client] = held + 1
        try:
            yield
        finally:
            self.total -= 1
            if self.by_client[client] > 1:
                self.by_client[client] -= 1
            else:
                del self.by_client[client]

    def _refuse(self, client: str, limit: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged >= REFUSAL_LOG_S:  # a script retrying in a loop does not flood the log
            self._logged = now
            log.warning("console: live feed refused to %s (%s; %d open, %d from it; %d refused so far)",
                        client or "?", limit, self.total, self.by_client.get(client, 0), self.refused)


LIVE_STREAMS_KEY: web.AppKey = web.AppKey("console_live_streams", LiveStreams)


def add_console_routes(app: web.Application, daemon: InspectDaemon) -> None:
    app[SESSIONS_KEY] = Sessions(daemon.config.console.session_ttl_s)
    app[LIVE_STREAMS_KEY] = LiveStreams()
    app.router.add_get("/console", to_console)
    routes = [
        ("GET", "/console/", page, "page"), ("GET", "/console/static/{name}", static, "page"),
        ("GET", "/console/api/session", session_info, "open"), ("POST", "/console/api/session", sign_in, "open"),
        ("DELETE", "/console/api/session", sign_out, "write"),
        ("GET", "/console/api/overview", overview, "read"), ("GET", "/console/api/frames", frames, "read"),
        ("GET", "/console/api/frames/{id}/{kind}", picture, "read"), ("GET", "/console/api/events", events, "read"),
        ("GET", "/console/api/feedback", feedback_log, "read"),
        ("POST", "/console/api/frames/{id}/feedback", give_feedback, "write"),
        ("POST", "/console/api/feedback/{id}/undo", undo_feedback, "write"),
        ("PUT", "/console/api/products/{id}/feedback-target", set_feedback_target, "write"),
    ]
    for method, path, handler, access in routes:
        app.router.add_route(method, path, _guard(handler, access))


async def to_console(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


def _guard(handler: Any, access: str) -> Any:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            if access == "read":
                check_read(request)
            elif access == "write":
                check_write(request)
            response = await handler(request)
        except (ConsoleError, FeedbackError) as exc:
            response = web.json_response({"error": str(exc)}, status=exc.status)
        except (RedisError, OSError) as exc:  # console.review: redis with its server down
            response = web.json_response({"error": f"the review store is unavailable ({type(exc).__name__}: {exc})"},
                                         status=503)
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: a JSON answer with the security headers, not aiohttp's page
            log.exception("console: %s failed", handler.__name__)
            response = web.json_response({"error": f"internal error ({type(exc).__name__})"}, status=500)
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    wrapper.__name__ = handler.__name__
    return wrapper


# ------------------------------------------------------------------------------------------------ auth
def _daemon(request: web.Request) -> InspectDaemon:
    return request.app[DAEMON_KEY]


def _session(request: web.Request) -> Session | None:
    return request.app[SESSIONS_KEY].get(request.cookies.get(COOKIE))


def _bearer_ok(request: web.Request) -> bool:
    """The request carries the right bearer token; a wrong one counts as a guess (`GuessLimiter`)."""
    if "Authorization" not in request.headers:
        return False
    daemon = _daemon(request)
    limiter = guess_limiter(daemon)
    if wait := limiter.retry_after(client_address(request)):
        raise ConsoleError(429, f"too many wrong tokens; retry in {wait:.0f} s")
    if bearer_matches(request, admin_token(daemon)):
        return True
    limiter.failed(client_address(request))
    return False


def check_read(request: web.Request) -> None:
    if reads_open(_daemon(request)) or _session(request) is not None or _bearer_ok(request):
        return
    raise ConsoleError(401, "sign in to the console first")


def check_write(request: web.Request) -> None:
    daemon = _daemon(request)
    if origin := foreign_origin(request, daemon):
        log.warning("console: %s %s with foreign Origin %r refused", request.method, request.path, origin)
        raise ConsoleError(403, f"cross-origin write refused (Origin {origin!r})")
    if _bearer_ok(request):
        return
    session = _session(request)
    given = request.headers.get(CSRF_HEADER, "")
    if session is None or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        log.warning("console: %s %s from %s refused (no session or CSRF token)", request.method, request.path,
                    request.remote)
        raise ConsoleError(401, "writes need a signed-in console session (and its CSRF token)")
    if request.can_read_body and request.content_type != "application/json":
        raise ConsoleError(415, f"content type {request.content_type!r} not accepted; use application/json")


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        raise ConsoleError(415, f"content type {request.content_type!r} not accepted; use application/json")
    try:
        body = json.loads(await request.text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConsoleError(400, f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ConsoleError(400, "body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------------------ page
def _static_bytes(name: str) -> bytes:
    return resources.files("inspectd").joinpath("data", "console", name).read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_static_bytes("index.html"), content_type="text/html", charset="utf-8")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise ConsoleError(404, f"no static file {name!r}")
    return web.Response(body=_static_bytes(name), content_type=STATIC_FILES[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------------------------ session
async def session_info(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    return web.json_response({"signed_in": _session(request) is not None, "reads_open": reads_open(daemon),
                              "token_hint": _token_hint(daemon)})


def _token_hint(daemon: InspectDaemon) -> str:
    if daemon.config.http.token or os.environ.get(TOKEN_ENV):
        return "the admin token from the daemon's configuration (http.token or INSPECTD_ADMIN_TOKEN)"
    path = daemon.config.http.token_file or str(default_token_file())
    return f"the admin token: on the daemon's machine, cat {path}"


async def sign_in(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    if origin := foreign_origin(request, daemon):
        raise ConsoleError(403, f"cross-origin sign-in refused (Origin {origin!r})")
    body = await _json_body(request)
    token, given = admin_token(daemon), str(body.get("token", "")).strip()
    limiter = guess_limiter(daemon)
    if wait := limiter.retry_after(client_address(request)):  # (guesses sent in parallel are not slowed by the sleep)
        raise ConsoleError(429, f"too many wrong tokens; retry in {wait:.0f} s")
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        limiter.failed(client_address(request))
        log.warning("console: sign-in from %s refused (wrong token)", request.remote)
        await asyncio.sleep(0.5)  # a guess costs time
        raise ConsoleError(401, "wrong token")
    session_id, session = request.app[SESSIONS_KEY].create()
    response = web.json_response({"signed_in": True, "csrf": session.csrf, "expires": session.expires})
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict", path="/console",
                        max_age=int(daemon.config.console.session_ttl_s), secure=request.secure)
    log.info("console: session started from %s", request.remote)
    return response


async def sign_out(request: web.Request) -> web.Response:
    request.app[SESSIONS_KEY].drop(request.cookies.get(COOKIE))
    response = web.json_response({"signed_in": False})
    response.del_cookie(COOKIE, path="/console")
    return response


# ------------------------------------------------------------------------------------------------ reads
def _product_view(daemon: InspectDaemon, product_id: str) -> dict[str, Any]:
    registry = daemon.registry
    entry = registry.get(product_id) if registry else None
    view: dict[str, Any] = {"id": product_id, "status": registry.status(product_id) if registry else None,
                            "error": registry.error(product_id) if registry else None,
                            "build": registry.progress(product_id) if registry else None}
    if entry is not None:
        view.update(version=entry.version, detector=entry.config.detector, model=entry.model,
                    shots=entry.state.meta.get("shots", len(entry.references)), references=len(entry.references),
                    threshold=entry.threshold, calibration=_calibration(entry), line_mask=str(entry.mask_policy),
                    references_dir=entry.config.references, holdout_dir=entry.config.threshold.holdout_dir)
    view["stats"] = daemon.review.product_stats(product_id)
    view["feedback_target"] = daemon.feedback.target_for(product_id) if daemon.feedback else None
    return view


def _calibration(entry: Any) -> str:
    """How the threshold came about, in words (from the build's calibration record)."""
    if entry.config.threshold.value is not None:
        return f"fixed at {entry.config.threshold.value} (threshold.value)"
    info = entry.calibration or {}
    if info.get("method") != "quantile":
        return f"{info.get('method', 'calibrated')}" + (f": {info['reason']}" if info.get("reason") else "")
    sources = [f"{info[k]} {k.replace('_', '-')}" for k in ("leave_one_out", "shifted_views", "holdout") if info.get(k)]
    quantile = "max" if info.get("quantile") == 1.0 else f"quantile {info.get('quantile')}"
    return (f"{quantile} of {info.get('normals', '?')} normal scores ({', '.join(sources) or 'references'}) "
            f"{info.get('margin', 0):+g}; normals {info.get('min_normal', 0):.4f}..{info.get('max_normal', 0):.4f}")


async def overview(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    ids = sorted(set(daemon.registry.ids() if daemon.registry else []) | set(daemon.review.stats))
    hub = daemon.review
    store_error = None
    try:
        listing, kept = await hub.listing(limit=10**6), await hub.kept()
    except (RedisError, OSError) as exc:  # the products' panel needs no review store: it still answers
        listing, kept, store_error = [], None, f"{type(exc).__name__}: {exc}"
    return web.json_response({
        "products": [_product_view(daemon, pid) for pid in ids],
        "review": {"keeping": hub.keeping, "keep_ng": hub.config.keep_ng, "keep_ok": hub.config.keep_ok,
                   "kept": kept, "max_side": hub.config.max_side, "store_error": store_error,
                   "skipped": {f"{v} {r}": n for (v, r), n in hub.skipped.items()},
                   "ng_per_s": hub.config.ng_per_s, "ok_per_s": hub.config.ok_per_s,
                   "store": hub.config.review},
        "feedback": daemon.feedback is not None and daemon.feedback.root is not None,
        "feedback_dir": str(daemon.feedback.root) if daemon.feedback and daemon.feedback.root else None,
        "demo_weights": bool(daemon.backbone.demo_weights) if daemon.backbone else None,
        "lines": sorted({s["line"] for s in listing}),
    })


async def frames(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = max(1, min(500, int(query.get("limit", "100"))))
    except ValueError as exc:
        raise ConsoleError(400, "limit must be an integer") from exc
    summaries = await _daemon(request).review.listing(query.get("product") or None, query.get("line") or None, limit)
    return web.json_response({"frames": summaries})


async def picture(request: web.Request) -> web.Response:
    item = await _daemon(request).review.fetch(request.match_info["id"])
    kind = PICTURES.get(request.match_info["kind"])
    if item is None or kind is None:
        raise ConsoleError(404, "no such frame in the review buffer (it may have been evicted)")
    data = getattr(item, kind[0])
    if data is None:
        raise ConsoleError(404, "this frame has no mask (the detector or the product's mask policy gives none)")
    return web.Response(body=data, content_type=kind[1], headers={"Cache-Control": "private, max-age=3600"})


async def feedback_log(request: web.Request) -> web.Response:
    store = _daemon(request).feedback
    if store is None:
        return web.json_response({"feedback": []})
    records = await asyncio.to_thread(store.history, request.query.get("product") or None)
    return web.json_response({"feedback": records[-200:]})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: ``frame`` (a newly kept frame), ``product`` (a product changed), ``feedback``. Each
    stream holds one of its client's `LiveStreams` slots until it ends (429 / 503 when there is none)."""
    hub = _daemon(request).review
    with request.app[LIVE_STREAMS_KEY].slot(client_address(request)):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        queue = hub.subscribe()
        try:
            _drop_when_unacknowledged(request)
            await response.prepare(request)
            await _stream(request, response, queue)
        except ConnectionResetError:  # the client went away mid-write
            pass
        finally:
            hub.unsubscribe(queue)
    return response


def _drop_when_unacknowledged(request: web.Request) -> None:
    """Linux's TCP_USER_TIMEOUT on the stream's socket: the keep-alives then find a silently vanished client."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if option is None or sock is None:
        return
    with suppress(OSError):  # not TCP (a Unix socket)
        sock.setsockopt(socket.IPPROTO_TCP, option, LIVE_UNACKED_MS)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _still_allowed(request: web.Request) -> bool:
    try:
        return reads_open(_daemon(request)) or _session(request) is not None or _bearer_ok(request)
    except ConsoleError:  # its bearer is throttled now: end the stream (no error page inside it)
        return False


async def _stream(request: web.Request, response: web.StreamResponse, queue: asyncio.Queue) -> None:
    loop = asyncio.get_running_loop()
    await response.write(b"retry: 2000\n\n")
    last_write = loop.time()
    while True:
        try:
            message = await asyncio.wait_for(queue.get(), LIVE_CHECK_S)
        except TimeoutError:
            if _client_gone(request):
                return  # closed (tab closed, connection reset or timed out): the slot is free now, not at a write
            if loop.time() - last_write < KEEP_ALIVE_S:
                continue
            message = ("keep-alive", None)
        if message is None:  # the daemon is stopping
            return
        if not _still_allowed(request):
            return  # signed out or expired: the stream ends with the session
        event, data = message
        if event == "keep-alive":
            await response.write(b": keep-alive\n\n")
        else:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        last_write = loop.time()


# ------------------------------------------------------------------------------------------------ writes
async def give_feedback(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    if daemon.feedback is None:
        raise ConsoleError(409, "feedback is off: set console.feedback_dir (or registry.references_root)")
    item = await daemon.review.fetch(request.match_info["id"])
    if item is None:
        raise ConsoleError(404, "no such frame in the review buffer (it may have been evicted)")
    if not await daemon.review.claim(item):
        raise ConsoleError(409, "this frame already has feedback (or one is under way); undo it first")
    try:
        body = await _json_body(request)
        action = body.get("action")
        remote = request.remote or "?"
        if action == FALSE_ALARM:
            record = await daemon.feedback.false_alarm(item, body.get("target"), remote)
        elif action == DEFECT:
            record = await daemon.feedback.defect(item, str(body.get("label") or "defect"), remote)
        else:
            raise ConsoleError(400, f"action must be {FALSE_ALARM!r} or {DEFECT!r}, got {action!r}")
    except BaseException:
        await daemon.review.release(item)
        raise
    await daemon.review.set_feedback(item, record)
    return web.json_response({"feedback": record, "product": _product_view(daemon, item.result["product"])},
                             status=201)


async def undo_feedback(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    if daemon.feedback is None:
        raise ConsoleError(409, "feedback is off")
    record = await daemon.feedback.undo(request.match_info["id"], request.remote or "?")
    item = await daemon.review.fetch(record.get("item") or "")
    if item is not None and item.feedback and item.feedback.get("id") == record["undoes"]:
        await daemon.review.set_feedback(item, None)
    return web.json_response({"undo": record, "product": _product_view(daemon, record["product"])})


async def set_feedback_target(request: web.Request) -> web.Response:
    """Where this product's false alarms go, for every operator: references | holdout."""
    daemon = _daemon(request)
    product = request.match_info["id"]
    if daemon.feedback is None or daemon.registry is None or daemon.registry.status(product) is None:
        raise ConsoleError(404 if daemon.feedback else 409, f"no product {product[:80]!r} to set (or feedback off)")
    target = str((await _json_body(request)).get("target", ""))
    await asyncio.to_thread(daemon.feedback.set_target, product, target)
    log.info("console: false alarms of %s now go to %s (from %s)", product, target, request.remote)
    daemon.review.publish("product", {"id": product})
    return web.json_response(_product_view(daemon, product))
