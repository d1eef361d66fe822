"""The Redis review store against the real Redis, with items rendered from the shared images: the live feed hears
every entry of both streams, survives entries that are not its own, and a frame's feedback is what Redis says,
whichever instance's console gave or undid it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from inspectd.daemon.config import ConsoleConfig
from inspectd.daemon.review import ReviewHub, ReviewItem, render_item
from inspectd.daemon.review_redis import ADD_AND_TRIM, RedisReviewStore, originals_keys, pack, review_keys
from inspectd.streams.schema import Frame, Result
from tests.console_helpers import DEFECTS, GOODS
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis


def item(path: Any, verdict: str, frame_id: str) -> ReviewItem:
    mask = np.zeros((96, 96), np.float32)
    mask[20:40, 30:60] = 0.9
    result = Result("nut", "l1", frame_id, 0.0, score=0.9 if verdict == "NG" else 0.1, verdict=verdict,
                    threshold=0.5, detector="winclip", state_version="1", mask=mask)
    return render_item("x", result, Frame("nut", "l1", frame_id, 0.0, payload=png_bytes(path)), max_side=96)


@pytest.fixture
async def client(redis_url: str, key_prefix: str) -> AsyncIterator[Any]:
    connection = aioredis.from_url(redis_url)
    yield connection
    keys = [k async for k in connection.scan_iter(f"{key_prefix}:*")]
    if keys:
        await connection.delete(*keys)
    await connection.aclose()


async def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_the_live_feed_hears_an_entry_added_to_the_other_stream_while_one_is_handled(
        client: Any, redis_url: str, key_prefix: str) -> None:
    store = RedisReviewStore(client, key_prefix, {"NG": 10, "OK": 10})
    other = redis.Redis.from_url(redis_url)  # another instance's scorer, adding while this one handles a reply
    add = other.register_script(ADD_AND_TRIM)
    ok = item(GOODS[0], "OK", "ok-1")
    keys = review_keys(key_prefix)
    heard: list[dict[str, Any]] = []

    def on_summary(summary: dict[str, Any]) -> None:
        heard.append(summary)
        if summary["frame_id"] == "ng-1":
            add(keys=[*keys["OK"], f"{key_prefix}:{{console}}:review:feedback", *originals_keys(key_prefix)],
                args=[10, json.dumps({**ok.result, "has_mask": True}), pack(ok, original=False), b"", 0])

    task = asyncio.create_task(store.tail(on_summary))
    try:
        await asyncio.sleep(0.3)  # the tail is reading
        await store.add(item(DEFECTS[0], "NG", "ng-1"))
        assert await wait_for(lambda: len(heard) == 2), f"heard only {[s['frame_id'] for s in heard]}"
        assert [s["frame_id"] for s in heard] == ["ng-1", "ok-1"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        other.close()


async def test_an_entry_that_is_no_review_summary_neither_stops_the_feed_nor_breaks_the_listing(
        client: Any, key_prefix: str) -> None:
    store = RedisReviewStore(client, key_prefix, {"NG": 10, "OK": 10})
    heard: list[dict[str, Any]] = []
    task = asyncio.create_task(store.tail(heard.append))
    try:
        await asyncio.sleep(0.3)
        stream = review_keys(key_prefix)["NG"][0]
        for fields in ({"junk": "1"}, {"summary": "not json"}, {"summary": "[1, 2]"}, {"summary": '{"a": 1}'}):
            await client.xadd(stream, fields)  # an older version's entry, a manual XADD, a tool writing there
        entry_id = await store.add(item(DEFECTS[0], "NG", "ng-1"))
        assert await wait_for(lambda: len(heard) == 1), "the live feed stopped at an entry that is not its own"
        assert heard[0]["frame_id"] == "ng-1" and not task.done()
        assert [s["id"] for s in await store.summaries(10)] == [entry_id]  # the console's list still answers
        assert (await store.get(entry_id)).result["frame_id"] == "ng-1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_feedback_given_and_undone_at_one_console_is_what_the_other_console_sees(
        client: Any, key_prefix: str) -> None:
    config = ConsoleConfig(review="redis")
    here, there = ReviewHub(config), ReviewHub(config)  # two daemons' consoles on one Redis
    here.store = RedisReviewStore(client, key_prefix, {"NG": 10, "OK": 10})
    there.store = RedisReviewStore(client, key_prefix, {"NG": 10, "OK": 10})
    entry_id = await here.store.add(item(DEFECTS[0], "NG", "ng-1"))

    seen = await there.fetch(entry_id)  # an operator there opens the frame (its pictures are cached there)
    assert seen is not None and seen.feedback is None
    mine = await here.fetch(entry_id)
    assert await here.claim(mine)
    await here.set_feedback(mine, {"id": "fb1", "action": "defect"})
    again = await there.fetch(entry_id)
    assert again.feedback == {"id": "fb1", "action": "defect"}  # the list there shows it: fetch agrees
    assert not await there.claim(again)

    await here.set_feedback(await here.fetch(entry_id), None)  # undone here
    after_undo = await there.fetch(entry_id)
    assert after_undo.feedback is None
    assert await there.claim(after_undo), "the frame was undone, yet the other console refuses feedback on it"
    await there.release(after_undo)


async def test_feedback_on_a_frame_trimmed_meanwhile_leaves_no_mark_behind_and_no_console_acts_on_it_again(
        client: Any, key_prefix: str) -> None:
    config = ConsoleConfig(review="redis", keep_ng=2)
    here, there = ReviewHub(config), ReviewHub(config)
    here.store = RedisReviewStore(client, key_prefix, {"NG": 2, "OK": 2})
    there.store = RedisReviewStore(client, key_prefix, {"NG": 2, "OK": 2})
    marks = f"{key_prefix}:{{console}}:review:feedback"
    first = await here.store.add(item(DEFECTS[0], "NG", "ng-0"))
    assert await there.fetch(first) is not None  # open in a console there
    mine = await here.fetch(first)
    assert await here.claim(mine)  # an operator here starts a false alarm (a rebuild: seconds) ...
    for i in range(1, 4):  # ... while an all-NG line pushes the frame out of the buffer
        await here.store.add(item(DEFECTS[i % len(DEFECTS)], "NG", f"ng-{i}"))
    await here.set_feedback(mine, {"id": "fb1", "action": "false_alarm"})
    assert await client.hlen(marks) == 0, "a mark for a frame no longer kept stays in Redis for ever"
    assert await there.fetch(first) is None  # gone from every console, as from memory
    assert await here.fetch(first) is None


async def test_a_review_store_that_is_down_logs_now_and_then_not_once_a_frame(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the review Redis is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hub = ReviewHub(ConsoleConfig(review="redis", ng_per_s=1000.0))
    dead = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
    hub.store = RedisReviewStore(dead, "down", {"NG": 100, "OK": 100})
    payload = png_bytes(DEFECTS[0])
    frames, results = {}, []
    for i in range(30):  # an all-NG line scoring from a folder or camera while Redis is away
        frames[("cam", None, f"f{i}")] = Frame("nut", "l1", f"f{i}", 0.0, payload=payload, source="cam")
        results.append(Result("nut", "l1", f"f{i}", 0.0, score=0.9, verdict="NG", threshold=0.5, detector="winclip",
                              state_version="1", source="cam"))
    with caplog.at_level(logging.WARNING, logger="inspectd.daemon.review"):
        hub.observe(results, [], frames)
        assert await wait_for(lambda: hub._capture.empty(), 20.0)
        await asyncio.sleep(0.5)  # the last one taken is being tried
        await hub.close()
    reports = [r for r in caplog.records if "could not keep frame" in r.getMessage()]
    assert 1 <= len(reports) <= 2, f"{len(reports)} tracebacks for 30 frames"
    await dead.aclose()
