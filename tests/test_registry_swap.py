"""Hot swaps under a steady frame stream (real Redis, tiny model): every frame one result with the version that
was serving when its batch ran; rejected updates (422) leave the old version serving."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ProductConfig, build
from inspectd.daemon.registry import BUILDING, ProductEntry
from inspectd.detectors.base import register_detector
from inspectd.detectors.winclip import WinClip, WinClipOptions
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, read_stream

pytestmark = pytest.mark.redis

TOKEN = "swap-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def swap_config(redis_url: str, prefix: str, tmp: Path) -> Any:
    config = daemon_config(redis_url, prefix, tmp, http={"enabled": True, "port": 0, "token": TOKEN},
                           registry={"watch": False}, redis={"url": redis_url, "prefix": prefix, "lines": ["l1"],
                                                             "block_ms": 50, "control_stream": None},
                           batcher={"max_batch_size": 8, "max_delay_ms": 20, "queue_size": 64})
    config.products = [p for p in config.products if p.id == "nut"]
    return config


async def start_recording(config: Any, backbone: Any) -> tuple[InspectDaemon, list[tuple[float, str, int]],
                                                                 list[dict]]:
    """A started daemon whose registry swaps and engine batches are recorded."""
    daemon = InspectDaemon(config, backbone=backbone)
    swaps: list[tuple[float, str, int]] = []
    entries: dict[int, ProductEntry] = {}
    batches: list[dict] = []
    original_hook = daemon._on_registry_change

    def on_change(entry: ProductEntry | None, product_id: str) -> None:
        if entry is not None:
            swaps.append((time.time(), product_id, entry.version))
            entries[id(entry.state)] = entry
        original_hook(entry, product_id)

    daemon._on_registry_change = on_change
    await daemon.start()
    score = daemon.engine.score

    async def recording_score(items: list, frames: list | None = None) -> Any:
        used = [entries[id(item.state)] for item in items]
        # the batch runs with exactly the entries serving right now
        stale = [(e.id, e.version) for e in used if daemon.registry.get(e.id) is not e]
        batches.append({"at": time.time(), "versions": {(e.id, e.version) for e in used}, "stale": stale})
        return await score(items, frames)

    daemon.engine.score = recording_score
    return daemon, swaps, batches


async def test_swaps_under_load_every_frame_once_with_the_serving_version(redis_client, redis_url, key_prefix,
                                                                          tmp_path, tiny_backbone) -> None:
    daemon, swaps, batches = await start_recording(swap_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    base = f"http://127.0.0.1:{daemon.http_port}"
    frames_key = f"{key_prefix}:{{l1}}:frames"
    image = png_bytes(HAZELNUT / "good" / "05.png")
    sent: dict[str, str] = {}  # frame id -> product
    b_ready = asyncio.Event()

    async def produce(seconds: float, rate: float) -> None:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            await redis_client.xadd(frames_key, frame_fields("nut", "l1", f"nut-{i:04d}", image))
            sent[f"nut-{i:04d}"] = "nut"
            if b_ready.is_set():
                await redis_client.xadd(frames_key, frame_fields("bolt", "l1", f"bolt-{i:04d}", image))
                sent[f"bolt-{i:04d}"] = "bolt"
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))

    producer = asyncio.create_task(produce(8.0, 20.0))
    async with aiohttp.ClientSession(base, headers=AUTH) as http:
        for n, goods in enumerate([("10", "11"), ("12", "13"), ("14", "15")]):
            await asyncio.sleep(1.5)
            upload = aiohttp.FormData()
            for name in goods:
                upload.add_field("file", png_bytes(HAZELNUT / "good" / f"{name}.png"), filename=f"{name}.png")
            async with http.post("/products/nut/references?replace=true", data=upload) as response:
                assert response.status == 201, await response.text()
                assert (await response.json())["version"] == n + 2
            if n == 0:
                refs = daemon.registry.get("nut").config.references
                async with http.put("/products/bolt", json={"object_name": "bolt", "references": refs,
                                                            "shots": 2}) as response:
                    assert response.status == 201, await response.text()
                b_ready.set()
    await producer
    deadline = time.monotonic() + 30
    while True:
        results = await read_stream(redis_client, f"{key_prefix}:{{l1}}:results")
        if len(results) >= len(sent) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    dead = await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")
    await daemon.shutdown()

    assert not dead, dead[:3]
    assert sum(p == "nut" for p in sent.values()) >= 150 and sum(p == "bolt" for p in sent.values()) >= 40
    ids = [r["frame_id"] for r in results]
    assert len(ids) == len(set(ids)), "a frame got two results"
    assert set(ids) == set(sent), f"lost: {sorted(set(sent) - set(ids))[:5]}"
    for record in results:
        assert record["product"] == sent[record["frame_id"]], record  # no misattribution

    # registry swaps: monotonic per product, nut 1..4 and bolt 1
    swap_at = {(product, version): at for at, product, version in swaps}
    for product in ("nut", "bolt"):
        versions = [v for _, p, v in swaps if p == product]
        assert versions == sorted(versions) == list(range(1, len(versions) + 1))
    assert [v for _, p, v in swaps if p == "nut"] == [1, 2, 3, 4]
    # every batch used the entries serving when it ran
    assert batches and not [b for b in batches if b["stale"]]

    by_frame = {r["frame_id"]: r for r in results}
    seen = {v: set() for v in ("nut", "bolt")}
    for product in ("nut", "bolt"):
        frame_ids = sorted(f for f, p in sent.items() if p == product)
        versions = [int(by_frame[f]["state_version"]) for f in frame_ids]
        assert versions == sorted(versions), f"{product}: versions go back in frame order"
        seen[product] = set(versions)
        for frame_id in frame_ids:
            record = by_frame[frame_id]
            version = int(record["state_version"])
            published_ms = int(record["_id"].split("-")[0])
            frame_added_ms = int(record["entry_id"].split("-")[0])
            # the version existed when the result was published...
            assert published_ms >= int(swap_at[(product, version)] * 1000), (frame_id, version)
            # ...and no later version was already serving before the frame even arrived
            newer = [v for (p, v), at in swap_at.items() if p == product and v > version
                     and at * 1000 < frame_added_ms - 2]
            assert not newer, (frame_id, version, newer)
    assert seen["nut"] == {1, 2, 3, 4}
    assert seen["bolt"] == {1}


async def test_bad_updates_are_422_and_the_old_version_keeps_serving(redis_client, redis_url, key_prefix, tmp_path,
                                                                     tiny_backbone, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="inspectd.daemon.registry")
    daemon, swaps, _ = await start_recording(swap_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    frames_key = f"{key_prefix}:{{l1}}:frames"
    image = png_bytes(HAZELNUT / "colour" / "03.png")
    refs = Path(daemon.registry.get("nut").config.references)
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (corrupt / "01.png").write_bytes(b"not even a header")
    sent = 0

    async def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            await redis_client.xadd(frames_key, frame_fields("nut", "l1", f"f{sent:03d}", image))
            sent += 1

    cases = [
        ({"object_name": "hazelnut", "references": str(empty), "shots": 2}, "holds no images"),
        ({"object_name": "hazelnut", "references": str(corrupt), "shots": 2}, "cannot be read"),
        ({"object_name": "hazelnut", "references": str(refs), "detector": "nosuch"}, "unknown detector 'nosuch'"),
        ({"object_name": "hazelnut", "references": str(tmp_path / "missing")}, "does not exist"),
    ]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http:
        for body, message in cases:
            await send(5)
            caplog.clear()
            async with http.put("/products/nut", json=body) as response:
                answer = await response.json()
            assert response.status == 422, answer
            assert message in answer["error"], answer
            assert any(message in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
            async with http.get("/products/nut") as response:
                state = await response.json()
            assert state["version"] == 1 and state["status"] == "ready" and message in state["error"]
            assert state["config"]["references"] == str(refs)  # the old definition still serves
        # the serving product's own directory emptied, then an explicit reload: rejected the same way
        saved = {p.name: p.read_bytes() for p in refs.iterdir()}
        for p in refs.iterdir():
            p.unlink()
        async with http.post("/products/nut/reload") as response:
            assert response.status == 422 and "holds no images" in (await response.json())["error"]
        await send(5)
        deadline = time.monotonic() + 20
        while len(results := await read_stream(redis_client, f"{key_prefix}:{{l1}}:results")) < sent:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert len(results) == sent == 25
        assert {r["state_version"] for r in results} == {"1"}  # every frame scored, all by the old state
        for name, data in saved.items():
            (refs / name).write_bytes(data)
        async with http.post("/products/nut/reload") as response:
            answer = await response.json()
        assert response.status == 200 and answer["version"] == 2 and answer["error"] is None
    await daemon.shutdown()
    assert [v for _, _, v in swaps] == [1, 2]
    text = daemon.metrics.exposition().decode()
    assert 'inspectd_product_reloads_total{outcome="error",product="nut"} 5.0' in text


@dataclass(frozen=True)
class SlowFitOptions(WinClipOptions):
    fit_s: float = 0.0
    fail: bool = False


@register_detector
class SlowFit(WinClip):
    """WinCLIP whose fit takes ``fit_s`` seconds, stoppable like a training fit, and then fails with ``fail``."""

    name = "test-swap-slow-fit"
    Options = SlowFitOptions

    def fit(self, spec, references, ctx=None):  # noqa: ANN001, ANN201
        end = time.monotonic() + self.options.fit_s
        while time.monotonic() < end:
            if ctx is not None:
                ctx.check_stop()
            time.sleep(0.02)
        if self.options.fail:
            raise RuntimeError("fit failed (simulated: CUDA out of memory while training)")
        return super().fit(spec, references, ctx)


async def start_parking(redis_url: str, prefix: str, tmp: Path, backbone: Any, wait_timeout_s: float,
                        queue_size: int) -> InspectDaemon:
    """A started daemon serving `nut` whose frames of a product still building wait for its first build."""
    config = daemon_config(redis_url, prefix, tmp,
                           registry={"watch": False, "on_building": "wait", "wait_timeout_s": wait_timeout_s},
                           redis={"url": redis_url, "prefix": prefix, "lines": ["l1"], "block_ms": 50,
                                  "control_stream": None},
                           batcher={"max_batch_size": 4, "max_delay_ms": 10, "queue_size": queue_size})
    config.products = [p for p in config.products if p.id == "nut"]
    daemon = InspectDaemon(config, backbone=backbone)
    await daemon.start()
    return daemon


async def until_building(daemon: InspectDaemon, product_id: str) -> None:
    deadline = time.monotonic() + 10
    while daemon.registry.status(product_id) != BUILDING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("ending", ["fails", "removed"])
async def test_frames_parked_for_a_first_build_go_as_soon_as_it_cannot_come(ending, redis_client, redis_url,
                                                                             key_prefix, tmp_path,
                                                                             tiny_backbone) -> None:
    """on_building: wait. Frames parked for a new product's first build are dead-lettered as soon as that build
    fails or the product is removed, not after wait_timeout_s; meanwhile they hold backpressure permits, so a
    serving product's frame queued behind them is not held up either."""
    wait_timeout = 10.0
    daemon = await start_parking(redis_url, key_prefix, tmp_path, tiny_backbone, wait_timeout, queue_size=4)
    frames_key = f"{key_prefix}:{{l1}}:frames"
    image = png_bytes(HAZELNUT / "good" / "05.png")
    new = build(ProductConfig, {"id": "newp", "object_name": "hazelnut", "references": str(tmp_path / "refs"),
                                "shots": 2, "detector": SlowFit.name,
                                "options": {"fit_s": 3.0 if ending == "fails" else 60.0,
                                            "fail": ending == "fails"}}, "")
    try:
        building = daemon.background(daemon.registry.put(new))
        await until_building(daemon, "newp")
        for i in range(4):  # as many as there are permits: all parked
            await redis_client.xadd(frames_key, frame_fields("newp", "l1", f"new{i}", image))
        await asyncio.sleep(0.8)
        await redis_client.xadd(frames_key, frame_fields("nut", "l1", "nut0", image))  # behind them
        assert daemon.registry.status("newp") == BUILDING  # the frames were parked while it built
        if ending == "removed":
            await asyncio.sleep(0.5)
            assert await daemon.registry.remove("newp")
        await asyncio.gather(building, return_exceptions=True)
        ended = time.time()
        deadline = time.monotonic() + wait_timeout + 5
        while True:
            dead = await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")
            results = await read_stream(redis_client, f"{key_prefix}:{{l1}}:results")
            if (len(dead) >= 4 and results) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await daemon.shutdown()

    def at(record: dict) -> float:  # when Redis took the entry in
        return int(record["_id"].split("-")[0]) / 1000

    reason = "product_failed" if ending == "fails" else "unknown_product"
    assert sorted((r["frame_id"], r["reason"]) for r in dead) == [(f"new{i}", reason) for i in range(4)], dead
    assert [r["frame_id"] for r in results] == ["nut0"]
    # released with the failure/removal, not after wait_timeout_s (10 s): within a fifth of it
    late = [round(at(r) - ended, 2) for r in [*dead, *results] if at(r) - ended > 0.2 * wait_timeout]
    assert not late, f"{ending}: released {late} s after the first build ended (wait_timeout_s {wait_timeout})"


async def test_a_frame_refused_for_its_cut_is_counted_once_whether_it_waited_for_a_build_or_not(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    """A strip needing more inputs than decode.max_tiles is one too_many_tiles dead letter and one count in
    inspectd_frames_dead_lettered: checked at decode for a serving product, and after its first build for a frame
    parked while the product built (that check used to be counted twice)."""
    from tests.test_hardening import thin_png

    daemon = await start_parking(redis_url, key_prefix, tmp_path, tiny_backbone, 10.0, queue_size=8)
    frames_key = f"{key_prefix}:{{l1}}:frames"
    new = build(ProductConfig, {"id": "newp", "object_name": "hazelnut", "references": str(tmp_path / "refs"),
                                "shots": 2, "detector": SlowFit.name, "options": {"fit_s": 1.5}}, "")
    strip = thin_png(10000, 10)
    try:
        building = daemon.background(daemon.registry.put(new))
        await until_building(daemon, "newp")
        await redis_client.xadd(frames_key, frame_fields("newp", "l1", "parked-strip", strip))
        await redis_client.xadd(frames_key, frame_fields("nut", "l1", "serving-strip", strip))
        await building
        deadline = time.monotonic() + 15
        while len(dead := await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await daemon.shutdown()
    assert sorted((d["frame_id"], d["reason"]) for d in dead) == [("parked-strip", "too_many_tiles"),
                                                                  ("serving-strip", "too_many_tiles")]
    for product in ("newp", "nut"):
        counted = daemon.metrics.registry.get_sample_value(
            "inspectd_frames_dead_lettered_total", {"product": product, "line": "l1", "reason": "too_many_tiles"})
        assert counted == 1.0, (product, counted)


async def test_a_shutdown_hands_frames_parked_for_a_long_build_back_at_once(redis_client, redis_url, key_prefix,
                                                                            tmp_path, tiny_backbone) -> None:
    """Frames parked for a first build (a training fit of minutes) held the shutdown until shutdown_timeout_s,
    which then exited 3 with them pending. They are handed back at once now: unacked (redelivered), not
    dead-lettered, while the serving product's frames are scored and acked as before."""
    daemon = await start_parking(redis_url, key_prefix, tmp_path, tiny_backbone, 30.0, queue_size=8)
    frames_key = f"{key_prefix}:{{l1}}:frames"
    image = png_bytes(HAZELNUT / "good" / "05.png")
    new = build(ProductConfig, {"id": "newp", "object_name": "hazelnut", "references": str(tmp_path / "refs"),
                                "shots": 2, "detector": SlowFit.name, "options": {"fit_s": 60.0}}, "")
    try:
        daemon.background(daemon.registry.put(new))
        await until_building(daemon, "newp")
        for i in range(2):
            await redis_client.xadd(frames_key, frame_fields("newp", "l1", f"new{i}", image))
        await redis_client.xadd(frames_key, frame_fields("nut", "l1", "nut0", image))
        deadline = time.monotonic() + 15
        while not await read_stream(redis_client, f"{key_prefix}:{{l1}}:results"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the two newp frames are parked by now
    finally:
        started = time.monotonic()
        await daemon.shutdown()
        took = time.monotonic() - started
    pending = await redis_client.xpending(frames_key, daemon.config.redis.group)
    assert took < daemon.config.shutdown_timeout_s / 2, f"shutdown took {took:.1f} s"
    assert (daemon.left_pending, daemon.handed_back, pending["pending"]) == (0, 2, 2)
    assert await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead") == []
