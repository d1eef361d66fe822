"""The frames as scored in the Redis review store stay within ``console.original_budget_mb``, as in memory, whatever
number of daemons write: counted in the real Redis after many large frames, and an item that gave up its original
still shows and takes feedback in the real console, saving its review image, as memory mode's evicted ones do."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image

from inspectd.daemon.config import ConsoleConfig
from inspectd.daemon.review import ReviewHub, ReviewItem, render_item
from inspectd.daemon.review_redis import RedisReviewStore, pack, review_keys
from inspectd.streams.schema import Frame, Result
from tests.console_helpers import DEFECTS, TOKEN, console_config, send, start
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis

MIB = 1024 * 1024


def noise_png(seed: int, side: int = 256) -> bytes:
    """A PNG that does not compress (~side * side * 3 bytes): what a camera frame costs, small enough to be quick."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def large_item(i: int, verdict: str, side: int = 256) -> ReviewItem:
    result = Result("nut", "l1", f"{verdict}-{i}", 0.0, score=0.9 if verdict == "NG" else 0.1, verdict=verdict,
                    threshold=0.5, detector="winclip", state_version="1", mask=np.zeros((64, 64), np.float32))
    frame = Frame("nut", "l1", f"{verdict}-{i}", 0.0, payload=noise_png(i, side))
    return render_item(f"mem-{verdict}-{i}", result, frame, keep_original=True, max_side=48)


def originals_keys(prefix: str) -> tuple[str, str]:
    """(the originals' hash, their order)."""
    return f"{prefix}:{{console}}:review:originals", f"{prefix}:{{console}}:review:originals:order"


async def hash_bytes(client: Any, key: str) -> int:
    return sum([await client.hstrlen(key, field) for field in await client.hkeys(key)])


async def test_originals_in_redis_stay_within_the_budget_with_two_daemons_writing_and_match_memory_mode(
        redis_url: str, key_prefix: str, redis_client: Any) -> None:
    budget_mb, keep = 1, {"NG": 8, "OK": 4}
    config = ConsoleConfig(review="redis", keep_ng=keep["NG"], keep_ok=keep["OK"], original_budget_mb=budget_mb)
    other = aioredis.from_url(redis_url)  # a second daemon's connection
    hubs = [ReviewHub(config), ReviewHub(config)]
    for hub, client in zip(hubs, (redis_client, other), strict=True):
        hub.use_store(RedisReviewStore(client, key_prefix, keep))  # as the daemon wires it
    memory = ReviewHub(ConsoleConfig(keep_ng=keep["NG"], keep_ok=keep["OK"], original_budget_mb=budget_mb))
    items = [large_item(i, "OK" if i % 3 == 2 else "NG") for i in range(18)]  # ~3.5 MB of originals
    assert sum(len(i.original) for i in items) > 3 * budget_mb * MIB
    ids: dict[str, str] = {}
    try:
        for n, item in enumerate(items):
            ids[item.result["frame_id"]] = await hubs[n % 2].store.add(item)
            memory._keep(item)  # the same frames, in memory mode
        in_streams = {s["frame_id"] for s in await hubs[0].store.summaries(100)}
        assert len(in_streams) == sum(keep.values())
        pictures = sum(len(pack(replace(i, original=None))) for i in items if i.result["frame_id"] in in_streams)
        used = sum([await redis_client.memory_usage(k, samples=0) or 0
                    async for k in redis_client.scan_iter(f"{key_prefix}:*")])
        assert used < budget_mb * MIB + pictures + 256 * 1024, f"the review keys use {used} bytes of Redis"
        originals, order = originals_keys(key_prefix)
        held = await hash_bytes(redis_client, originals)
        assert 0 < held <= budget_mb * MIB, f"{held} bytes of originals in Redis, budget {budget_mb} MiB"
        # nothing else holds them: the picture hashes hold their items' review pictures, no original
        assert sum([await hash_bytes(redis_client, p) for _, p in review_keys(key_prefix).values()]) == pictures
        # the frames keeping theirs are those memory mode keeps (the newest within the budget), and no trimmed or
        # evicted item is left in their order
        with_original = set()
        for frame_id, entry_id in ids.items():
            got = await hubs[0].fetch(entry_id)
            if got is not None and got.original is not None:
                with_original.add(frame_id)
        in_memory = {i.result["frame_id"] for i in memory.items(limit=100) if i.original is not None}
        assert with_original == in_memory and len(in_memory) >= 2
        assert await redis_client.zcard(order) == await redis_client.hlen(originals) == len(in_memory)
        newest = items[-1]
        assert (await hubs[1].fetch(ids[newest.result["frame_id"]])).original == newest.original  # as sent
    finally:
        for hub in hubs:
            await hub.close()
        await other.aclose()


async def test_a_frame_cached_in_a_console_gives_up_its_original_when_redis_drops_it(
        key_prefix: str, redis_client: Any) -> None:
    hub = ReviewHub(ConsoleConfig(review="redis", original_budget_mb=1))
    hub.use_store(RedisReviewStore(redis_client, key_prefix, {"NG": 20, "OK": 20}))
    try:
        first = await hub.store.add(large_item(0, "NG"))
        assert (await hub.fetch(first)).original is not None  # opened in the console: cached there
        for i in range(1, 8):  # newer frames push its original over the budget
            await hub.store.add(large_item(i, "NG"))
        item = await hub.fetch(first)
        assert item is not None and item.original is None  # as another instance's console sees it
        assert item.image_png and item.overlay_jpeg and item.amap is not None
    finally:
        await hub.close()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


async def test_the_console_saves_the_original_within_the_budget_and_the_review_image_past_it(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    frame = png_bytes(DEFECTS[0], 800)
    assert MIB / 2 < len(frame) < MIB  # one fits in the 1 MiB budget, two do not
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis", max_side=64,
                                        original_budget_mb=1), tiny_backbone)
    try:
        await send(redis_client, key_prefix, DEFECTS[:3], size=800)
        deadline = time.monotonic() + 30
        while len(listing := await daemon.review.listing()) < 3:
            assert time.monotonic() < deadline, "frames not kept for review"
            await asyncio.sleep(0.05)
        newest, *older = [s["id"] for s in listing]  # newest first
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post("/console/api/session", json={"token": TOKEN}) as response:
                csrf = {"X-CSRF-Token": (await response.json())["csrf"]}
            sizes = []
            for entry_id in (newest, older[-1]):
                async with http.get(f"/console/api/frames/{entry_id}/image.png") as response:
                    assert response.status == 200
                async with http.post(f"/console/api/frames/{entry_id}/feedback", headers=csrf,
                                     json={"action": "defect", "label": "colour"}) as response:
                    assert response.status == 201, await response.text()
                    image_path, mask_path = map(Path, (await response.json())["feedback"]["files"])
                sizes.append((png_size(image_path), png_size(mask_path)))
        assert sizes == [((800, 800), (800, 800)), ((64, 64), (64, 64))], sizes
        assert 0 < await hash_bytes(redis_client, originals_keys(key_prefix)[0]) <= MIB
    finally:
        await daemon.shutdown()


async def test_a_console_browsing_frames_holds_a_bounded_amount_of_their_originals(
        key_prefix: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import tracemalloc

    from inspectd.daemon import review_redis

    monkeypatch.setattr(review_redis, "FETCH_CACHE_BYTES", 2 * MIB, raising=False)
    writer = RedisReviewStore(redis_client, key_prefix, {"NG": 20, "OK": 20})
    writer.original_budget = 64 * MIB  # every one keeps its original
    ids = [await writer.add(large_item(i, "NG", 360)) for i in range(16)]  # ~390 KB of original each
    viewer = RedisReviewStore(redis_client, key_prefix, {"NG": 20, "OK": 20})
    gc.collect()
    tracemalloc.start()
    try:
        for entry_id in ids:  # an operator opens one frame after another
            assert (await viewer.get(entry_id)).original is not None
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 3 * MIB, f"the console holds {held} bytes of the frames it showed"
