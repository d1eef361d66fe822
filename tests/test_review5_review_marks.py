"""Redis failing just as a frame's feedback mark is written, with the real console, a real Redis behind a TCP proxy
that cuts every connection when the mark's script is sent: the mark is written once Redis is back, and the claim
stays renewed meanwhile, so no operator acts on the frame a second time."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest

from inspectd.daemon import review_redis
from inspectd.daemon.config import ConsoleConfig
from inspectd.daemon.review import ReviewHub, render_item
from inspectd.daemon.review_redis import MARK_IF_KEPT, RedisReviewStore, feedback_key
from inspectd.streams.schema import Frame, Result
from tests.console_helpers import DEFECTS, TOKEN, console_config, send, start
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis

TTL_S = 1.5
MARK_SHA = hashlib.sha1(MARK_IF_KEPT.encode()).hexdigest().encode()


class CuttingProxy:
    """A TCP proxy to the real Redis that fails as Redis going away does: once a client sends ``trigger``, every
    connection is cut and new ones are refused for ``outage_s`` (then it forwards again)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.trigger: bytes | None = None
        self.outage_s = 0.0
        self.down_until = 0.0
        self.cuts = 0
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: Any) -> None:
        self.server.close()
        self._cut_all()

    def arm(self, trigger: bytes, outage_s: float) -> None:
        self.trigger, self.outage_s = trigger, outage_s

    def _cut_all(self) -> None:
        for pair in list(self.pairs):
            for writer in pair:
                writer.transport.abort()
        self.pairs.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.down_until:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
            seen = b""
            try:
                while data := await src.read(65536):
                    if watch and self.trigger is not None and self.trigger in seen[-64:] + data:
                        self.trigger, self.down_until = None, time.monotonic() + self.outage_s
                        self.cuts += 1
                        self._cut_all()  # the command never reaches Redis
                        return
                    seen = data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                self.pairs.discard(pair)
                for w in pair:
                    w.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[CuttingProxy]:
    url = urlparse(redis_url)
    async with CuttingProxy(url.hostname or "127.0.0.1", url.port or 6379) as running:
        yield running


async def test_feedback_whose_mark_redis_drops_is_recorded_when_it_is_back_and_never_given_twice(
        proxy: CuttingProxy, redis_url: str, key_prefix: str, tmp_path, tiny_backbone, redis_client,  # noqa: ANN001
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(review_redis, "CLAIM_TTL_S", TTL_S)
    config = console_config(f"redis://127.0.0.1:{proxy.port}/0", key_prefix, tmp_path, review="redis")
    daemon = await start(config, tiny_backbone)  # all its Redis traffic through the proxy
    try:
        await send(redis_client, key_prefix, DEFECTS[:1])
        deadline = time.monotonic() + 30
        while not (listing := await daemon.review.listing()):
            assert time.monotonic() < deadline, "frame not kept for review"
            await asyncio.sleep(0.05)
        entry_id = listing[0]["id"]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post("/console/api/session", json={"token": TOKEN}) as response:
                csrf = {"X-CSRF-Token": (await response.json())["csrf"]}
            proxy.arm(MARK_SHA, outage_s=1.0)  # Redis goes away as the mark is written (the files are saved)
            feedback = f"/console/api/frames/{entry_id}/feedback"
            async with http.post(feedback, headers=csrf, json={"action": "defect", "label": "colour"}) as response:
                assert response.status == 201, await response.text()
            assert proxy.cuts == 1
            await asyncio.sleep(TTL_S * 2)  # past a claim's lifetime
            async with http.post(feedback, headers=csrf, json={"action": "defect", "label": "colour"}) as response:
                assert response.status == 409, "the frame took a second feedback action"
            async with http.get("/console/api/frames") as response:
                assert (await response.json())["frames"][0]["feedback"]["action"] == "defect"
        other = RedisReviewStore(redis_client, key_prefix, {"NG": 10, "OK": 10}, claim_ttl_s=TTL_S)
        assert not await other.claim(entry_id), "another instance's console may act on the frame again"
        assert json.loads(await redis_client.hget(feedback_key(key_prefix), entry_id))["action"] == "defect"
        assert len(list((daemon.feedback.root / "nut" / "colour").iterdir())) == 1
    finally:
        await daemon.shutdown()


async def test_a_mark_redis_refuses_longer_is_retried_in_the_background_with_the_claim_held(
        proxy: CuttingProxy, redis_url: str, key_prefix: str, redis_client: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.asyncio as aioredis

    monkeypatch.setattr(review_redis, "MARK_ATTEMPTS", 2, raising=False)
    here = ReviewHub(ConsoleConfig(review="redis"))
    through = aioredis.from_url(f"redis://127.0.0.1:{proxy.port}/0")
    here.store = RedisReviewStore(through, key_prefix, {"NG": 10, "OK": 10}, claim_ttl_s=TTL_S)
    other = RedisReviewStore(redis_client, key_prefix, {"NG": 10, "OK": 10}, claim_ttl_s=TTL_S)
    result = Result("nut", "l1", "ng-1", 0.0, score=0.9, verdict="NG", threshold=0.5, detector="winclip",
                    state_version="1")
    entry_id = await other.add(render_item("x", result, Frame("nut", "l1", "ng-1", 0.0,
                                                               payload=png_bytes(DEFECTS[0]))))
    try:
        item = await here.fetch(entry_id)
        assert await here.claim(item)
        proxy.arm(MARK_SHA, outage_s=TTL_S * 0.8)  # longer than the tries the request waits for
        started = time.monotonic()
        await here.set_feedback(item, {"id": "fb1", "action": "defect"})  # returns: the action is done
        assert time.monotonic() - started < TTL_S * 0.8 and proxy.cuts == 1
        assert not await other.claim(entry_id)  # the claim still holds meanwhile ...
        await asyncio.sleep(TTL_S * 2)
        mark = await redis_client.hget(feedback_key(key_prefix), entry_id)
        assert json.loads(mark) == {"id": "fb1", "action": "defect"}  # ... then the mark is written
        assert not await other.claim(entry_id)
        assert not here.store._writers and not here.store._claims
    finally:
        await here.close()
        await other.close()
        await through.aclose()
