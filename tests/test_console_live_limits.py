"""The console's live feed (Server-Sent Events) against a real daemon (real Redis, tiny model, real aiohttp):
one client cannot take every stream slot, the overall cap still holds, and slots come back when streams end,
also when the client just drops the connection.

Clients are told apart as `GuessLimiter` tells them (their address), so a second client here is a second
loopback address: Linux routes all of 127.0.0.0/8 to ``lo``, and a client bound to 127.0.0.2 reaches the
daemon on 127.0.0.1 as 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from inspectd.daemon import console as console_module
from inspectd.daemon.app import InspectDaemon
from tests.console_helpers import TOKEN, console_config, start, wait_until

pytestmark = pytest.mark.redis

EVENTS = "/console/api/events"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def daemon(redis_url, key_prefix, tmp_path, tiny_backbone) -> AsyncIterator[InspectDaemon]:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    yield daemon
    await daemon.shutdown()


def client(daemon: InspectDaemon, address: str) -> aiohttp.ClientSession:
    """An HTTP client whose connections come from ``address`` (a loopback address: the daemon sees that one)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0, force_close=True)
    return aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", connector=connector)


async def open_stream(http: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    """``GET /console/api/events``; when accepted, read until the stream's first line has arrived."""
    response = await http.get(EVENTS, headers=BEARER)
    if response.status == 200:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert await asyncio.wait_for(response.content.readline(), 10) == b"retry: 2000\n"
    return response


async def refused(http: aiohttp.ClientSession, status: int) -> str:
    """Open a stream that must be refused with ``status`` and a JSON error; the error's text."""
    response = await open_stream(http)
    try:
        assert response.status == status, f"expected {status}, got {response.status}"
        assert response.content_type == "application/json"
        body = await response.json()
    finally:
        response.close()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


async def reopen_within(http: aiohttp.ClientSession, seconds: float, refusal: int = 429) -> aiohttp.ClientResponse:
    """Retry opening a stream until one is accepted, for at most ``seconds`` (a refused try must be ``refusal``)."""
    deadline = time.monotonic() + seconds
    while True:
        response = await open_stream(http)
        if response.status == 200:
            return response
        assert response.status == refusal, response.status
        response.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"no live-feed slot came back within {seconds} s")
        await asyncio.sleep(0.1)


async def test_one_client_cannot_take_every_live_stream_and_gets_its_slot_back_on_close(daemon) -> None:  # noqa: ANN001
    limit = console_module.MAX_LIVE_STREAMS_PER_CLIENT
    assert 1 <= limit < console_module.MAX_LIVE_STREAMS
    first, second = client(daemon, "127.0.0.1"), client(daemon, "127.0.0.2")
    streams: list[aiohttp.ClientResponse] = []
    try:
        for _ in range(limit):
            response = await open_stream(first)
            streams.append(response)
            assert response.status == 200
        error = await refused(first, 429)  # over its own limit: a clear answer, not a silent hang
        assert "per client" in error and str(limit) in error, error
        await refused(first, 429)  # refused tries take no slot and keep being refused
        other = await open_stream(second)  # another operator still gets the live view
        assert other.status == 200
        streams.append(other)
        # the client drops one stream (no clean end, the browser tab just closes): its slot comes back soon,
        # well before the next keep-alive write would find the connection gone
        streams.pop(0).close()
        assert console_module.KEEP_ALIVE_S > 5.0
        streams.append(await reopen_within(first, 5.0))
        await refused(first, 429)  # back at its limit: the slot came back once, not twice
        assert daemon.review.subscribers() == limit + 1
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # a client that vanishes without a FIN is dropped in time too
            sockets = [c.transport.get_extra_info("socket") for c in daemon.http.server.connections if c.transport]
            timeouts = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) for s in sockets]
            assert timeouts.count(console_module.LIVE_UNACKED_MS) == limit + 1, timeouts
    finally:
        for response in streams:
            response.close()
        await first.close()
        await second.close()
    await wait_until(lambda: daemon.review.subscribers() == 0, timeout=5, what="every stream released")
    live = daemon.http.app[console_module.LIVE_STREAMS_KEY]
    assert live.total == 0 and not live.by_client  # nothing leaked, no client left behind


async def test_the_overall_live_stream_cap_still_holds(daemon) -> None:  # noqa: ANN001
    per_client, overall = console_module.MAX_LIVE_STREAMS_PER_CLIENT, console_module.MAX_LIVE_STREAMS
    needed = -(-overall // per_client)  # clients that together fill every slot
    clients = [client(daemon, f"127.0.0.{10 + i}") for i in range(needed + 1)]
    streams: list[aiohttp.ClientResponse] = []
    try:
        for http in clients[:needed]:
            for _ in range(min(per_client, overall - len(streams))):
                response = await open_stream(http)
                streams.append(response)
                assert response.status == 200
        assert len(streams) == overall
        error = await refused(clients[-1], 503)  # a fresh client under its own limit: the server is full
        assert str(overall) in error, error
        streams.pop().close()
        streams.append(await reopen_within(clients[-1], 5.0, refusal=503))  # its slot (any client's) comes back
    finally:
        for response in streams:
            response.close()
        for http in clients:
            await http.close()
    await wait_until(lambda: daemon.review.subscribers() == 0, timeout=5, what="every stream released")


async def test_a_live_stream_slot_is_released_on_errors_and_cancellation() -> None:
    live = console_module.LiveStreams(overall=3, per_client=2)
    with pytest.raises(RuntimeError), live.slot("a"):
        assert live.total == 1 and live.by_client == {"a": 1}
        raise RuntimeError("the handler failed")
    assert live.total == 0 and not live.by_client

    entered = asyncio.Event()

    async def stream() -> None:
        with live.slot("a"):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(stream())
    await entered.wait()
    assert live.total == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live.total == 0 and not live.by_client

    with live.slot("a"), live.slot("a"):
        with pytest.raises(console_module.ConsoleError) as err, live.slot("a"):
            pass
        assert err.value.status == 429
        with live.slot("b"):
            with pytest.raises(console_module.ConsoleError) as err, live.slot("c"):
                pass
            assert err.value.status == 503
    assert live.total == 0 and not live.by_client and live.refused == 2  # a refusal takes no slot


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit_and_no_one_can_pick_one(
        redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    """`http.trusted_proxies`: behind nginx every client's TCP peer is the proxy, so all operators shared one
    client's 4 live views. The proxy's X-Forwarded-For now tells them apart; a client that writes its own
    X-Forwarded-For (to the left of what the proxy appends) still counts as itself, and without the setting the
    header is ignored: it cannot dodge the limit by naming a new address each time."""
    limit = console_module.MAX_LIVE_STREAMS_PER_CLIENT
    config = console_config(redis_url, key_prefix, tmp_path)
    config.http.trusted_proxies = ["127.0.0.1/32"]
    daemon = await start(config, tiny_backbone)
    proxy = client(daemon, "127.0.0.1")

    def via_proxy(*hops: str) -> dict[str, str]:
        return {**BEARER, "X-Forwarded-For": ", ".join(hops)}

    streams: list[aiohttp.ClientResponse] = []
    try:
        for i in range(limit):  # an operator at 10.0.0.1, each time claiming another address in front of it
            response = await proxy.get(EVENTS, headers=via_proxy(f"192.0.2.{i}", "10.0.0.1"))
            streams.append(response)
            assert response.status == 200
        spoofed = await proxy.get(EVENTS, headers=via_proxy("192.0.2.99", "10.0.0.1"))
        assert spoofed.status == 429  # the proxy saw 10.0.0.1: that client's limit
        spoofed.close()
        other = await proxy.get(EVENTS, headers=via_proxy("10.0.0.2"))  # another operator behind the proxy
        assert other.status == 200
        streams.append(other)
    finally:
        for response in streams:
            response.close()
        await proxy.close()
        await daemon.shutdown()

    untrusting = await start(console_config(redis_url, key_prefix, tmp_path / "b"), tiny_backbone)
    direct = client(untrusting, "127.0.0.1")
    streams = []
    try:
        for i in range(limit):
            response = await direct.get(EVENTS, headers=via_proxy(f"10.0.1.{i}"))
            streams.append(response)
            assert response.status == 200
        dodging = await direct.get(EVENTS, headers=via_proxy("10.0.1.200"))  # not a trusted proxy: ignored
        assert dodging.status == 429
        dodging.close()
    finally:
        for response in streams:
            response.close()
        await direct.close()
        await untrusting.shutdown()
