"""Feedback claims and marks in the Redis review store, against real daemons, a real Redis and a real process that
dies: a claim whose daemon was killed mid-action expires, a live one is never taken over, a mark that is no mark
neither breaks a console nor blocks feedback, and the review gauge counts what Redis holds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inspectd.daemon import review_redis
from inspectd.daemon.config import ConsoleConfig
from inspectd.daemon.review import ReviewHub, render_item
from inspectd.daemon.review_redis import RedisReviewStore, feedback_key
from inspectd.streams.schema import Frame, Result
from tests.console_helpers import DEFECTS, TOKEN, console_config, send, start
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis

TTL_S = 1.5  # renewed every TTL_S / 4: a busy test machine never starves a live claim that long
REPO = Path(__file__).resolve().parents[1]

# another instance's console claiming a frame for an action (a rebuild: seconds), then dying with it: SIGKILL, no
# finally, no release
CLAIMER = """
import asyncio, sys
import redis.asyncio as aioredis
from inspectd.daemon import review_redis

review_redis.CLAIM_TTL_S = float(sys.argv[4])

async def main():
    client = aioredis.from_url(sys.argv[1])
    store = review_redis.RedisReviewStore(client, sys.argv[2], {"NG": 10, "OK": 10})
    print("claimed" if await store.claim(sys.argv[3]) else "refused", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def claim_in_another_process(redis_url: str, prefix: str, item_id: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, redis_url, prefix, item_id, str(TTL_S)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line.strip() == "claimed", line
    return proc


@pytest.fixture
async def shared_console(redis_url, key_prefix, tmp_path, tiny_backbone, redis_client,  # noqa: ANN001
                         monkeypatch) -> AsyncIterator[tuple[Any, aiohttp.ClientSession, dict[str, str]]]:
    monkeypatch.setattr(review_redis, "CLAIM_TTL_S", TTL_S, raising=False)
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post("/console/api/session", json={"token": TOKEN}) as response:
                csrf = {"X-CSRF-Token": (await response.json())["csrf"]}
            yield daemon, http, csrf
    finally:
        await daemon.shutdown()


async def kept_ids(daemon: Any, n: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(listing := await daemon.review.listing()) < n:
        assert time.monotonic() < deadline, "frames not kept for review"
        await asyncio.sleep(0.05)
    return [s["id"] for s in listing]


async def test_a_frame_claimed_by_a_daemon_killed_mid_action_takes_feedback_again_but_a_live_claim_holds(
        shared_console, redis_url, key_prefix, redis_client) -> None:  # noqa: ANN001
    daemon, http, csrf = shared_console
    await send(redis_client, key_prefix, DEFECTS[:1])
    (entry_id,) = await kept_ids(daemon, 1)
    other = await claim_in_another_process(redis_url, key_prefix, entry_id)
    try:
        feedback = f"/console/api/frames/{entry_id}/feedback"
        for _ in range(2):  # 2 claim lifetimes: the live claim is renewed, never taken over
            await asyncio.sleep(TTL_S)
            async with http.post(feedback, headers=csrf, json={"action": "defect", "label": "colour"}) as response:
                assert response.status == 409, await response.text()
    finally:
        other.send_signal(signal.SIGKILL)  # that daemon dies holding the claim
        other.wait()
        other.stdout.close()
    await asyncio.sleep(TTL_S * 1.5)
    async with http.get("/console/api/frames") as response:
        assert (await response.json())["frames"][0]["feedback"] is None  # the page offers feedback again
    async with http.post(feedback, headers=csrf, json={"action": "defect", "label": "colour"}) as response:
        assert response.status == 201, await response.text()
    async with http.post(feedback, headers=csrf, json={"action": "defect", "label": "colour"}) as response:
        assert response.status == 409  # given now: one action per frame, as before
    assert len(list((daemon.feedback.root / "nut" / "colour").iterdir())) == 1


async def test_an_older_versions_claim_expires_too_and_a_release_never_drops_another_consoles_claim(
        redis_client, key_prefix, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(review_redis, "CLAIM_TTL_S", TTL_S, raising=False)
    here, there = ReviewHub(ConsoleConfig(review="redis")), ReviewHub(ConsoleConfig(review="redis"))
    here.store = RedisReviewStore(redis_client, key_prefix, {"NG": 10, "OK": 10})
    there.store = RedisReviewStore(redis_client, key_prefix, {"NG": 10, "OK": 10})
    result = Result("nut", "l1", "ng-1", 0.0, score=0.9, verdict="NG", threshold=0.5, detector="winclip",
                    state_version="1")
    entry_id = await here.store.add(render_item("x", result, Frame("nut", "l1", "ng-1", 0.0,
                                                                    payload=png_bytes(DEFECTS[0]))))
    # a claim written by a daemon before claims carried a time, that died with it
    await redis_client.hset(feedback_key(key_prefix), entry_id, json.dumps({"action": "pending"}))
    assert not await here.claim(await here.fetch(entry_id))  # it may still be live: not taken at once ...
    await asyncio.sleep(TTL_S * 1.2)
    mine = await here.fetch(entry_id)
    assert await here.claim(mine), "an old claim blocks feedback on this frame until it is trimmed"  # ... expired
    try:
        theirs = await there.fetch(entry_id)
        assert theirs.feedback is not None and "owner" not in theirs.feedback  # shown as under way, token kept
        assert not await there.claim(theirs)
        await there.release(theirs)  # a console giving up what it never held ...
        assert not await there.claim(await there.fetch(entry_id))  # ... leaves the live claim where it is
    finally:
        await here.release(mine)
    assert await there.claim(await there.fetch(entry_id))
    await there.release(await there.fetch(entry_id))
    await here.close()
    await there.close()


async def test_a_mark_that_is_no_mark_neither_breaks_the_console_nor_blocks_feedback(
        shared_console, key_prefix, redis_client) -> None:  # noqa: ANN001
    daemon, http, csrf = shared_console
    await send(redis_client, key_prefix, DEFECTS[:4])
    ids = await kept_ids(daemon, 4)
    forged = dict(zip(ids, ("not json", "[1, 2]", '"defect"', '{"no": "action"}'), strict=True))
    for entry_id, value in forged.items():  # another version's, or anyone's who may write to Redis
        await redis_client.hset(feedback_key(key_prefix), entry_id, value)
    async with http.get("/console/api/frames") as response:
        assert response.status == 200, await response.text()
        assert [f["feedback"] for f in (await response.json())["frames"]] == [None] * 4
    async with http.get("/console/api/overview") as response:
        assert response.status == 200 and (await response.json())["review"]["store_error"] is None
    for entry_id in ids:
        async with http.get(f"/console/api/frames/{entry_id}/image.png") as response:
            assert response.status == 200
        async with http.post(f"/console/api/frames/{entry_id}/feedback", headers=csrf,
                             json={"action": "defect", "label": "colour"}) as response:
            assert response.status == 201, await response.text()
    async with http.get("/console/api/frames") as response:
        assert [f["feedback"]["action"] for f in (await response.json())["frames"]] == ["defect"] * 4


def gauge(text: str, name: str = "inspectd_console_review_frames") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_the_review_gauge_counts_what_the_redis_store_holds_on_every_instance(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    scorer = await start(console_config(redis_url, key_prefix, tmp_path / "a", review="redis", keep_ng=3),
                         tiny_backbone)
    viewer_config = console_config(redis_url, key_prefix, tmp_path / "b", review="redis", keep_ng=3)
    viewer_config.sources.redis = False  # scores nothing: every frame it counts was kept by the scorer
    viewer = await start(viewer_config, tiny_backbone)
    try:
        await send(redis_client, key_prefix, DEFECTS[:2])
        await kept_ids(scorer, 2)
        for daemon in (scorer, viewer):
            async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}") as http:
                deadline = time.monotonic() + 10
                while True:
                    async with http.get("/metrics") as response:
                        value = gauge(await response.text())
                    if value == 2 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            assert value == 2, f"the review gauge says {value} while Redis holds 2 frames"
        more = await send(redis_client, key_prefix, DEFECTS[:4], tag="more")  # 6 NG: Redis keeps keep_ng = 3
        deadline = time.monotonic() + 30
        while (await scorer.review.listing())[0]["frame_id"] != more[-1]:
            assert time.monotonic() < deadline, "the last frame was not kept"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # counted at most every second, after the last addition too
        assert [d.metrics.review_frames._value.get() for d in (scorer, viewer)] == [3, 3]
    finally:
        await viewer.shutdown()
        await scorer.shutdown()


async def test_pictures_in_redis_that_cannot_be_read_answer_404_not_500(
        shared_console, key_prefix, redis_client) -> None:  # noqa: ANN001
    daemon, http, csrf = shared_console
    await send(redis_client, key_prefix, DEFECTS[:4])
    ids = await kept_ids(daemon, 4)
    pictures = f"{key_prefix}:{{console}}:review:NG:pictures"
    header = json.dumps({"sizes": [1, 1, 1, 1, 0, 0, 0], "has_mask": False, "amap_shape": None,
                         "original_suffix": ".png"}).encode()  # a newer version's format: one blob more
    values = [b"\x00", b"\x00\x00\x00\x09not json!", struct.pack(">I", len(header)) + header + b"abcd"]
    for entry_id, value in zip(ids[:3], values, strict=True):
        await redis_client.hset(pictures, entry_id, value)
    for entry_id in ids[:3]:
        for path in ("image.png", "overlay.jpg"):
            async with http.get(f"/console/api/frames/{entry_id}/{path}") as response:
                assert response.status == 404, (entry_id, response.status)
        async with http.post(f"/console/api/frames/{entry_id}/feedback", headers=csrf,
                             json={"action": "defect", "label": "colour"}) as response:
            assert response.status == 404
    async with http.get(f"/console/api/frames/{ids[3]}/image.png") as response:
        assert response.status == 200  # the others still show
    async with http.get("/console/api/frames") as response:
        assert response.status == 200 and len((await response.json())["frames"]) == 4
