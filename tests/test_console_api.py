"""The console's API against a real daemon (real Redis, tiny model, the shared hazelnut images): sessions and
what a hostile page can send, the bounded review buffer, live events, and feedback that changes the product."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from inspectd.daemon import review
from inspectd.detectors.data.datasets import open_dataset
from tests.console_helpers import DEFECTS, GOODS, TOKEN, console_config, send, start, wait_until

pytestmark = pytest.mark.redis


def JAR() -> aiohttp.CookieJar:  # noqa: N802
    return aiohttp.CookieJar(unsafe=True)  # a browser keeps cookies for 127.0.0.1; aiohttp needs unsafe=True


@pytest.fixture
async def console(redis_url, key_prefix, tmp_path, tiny_backbone, redis_client):  # noqa: ANN001, ANN201
    daemon = await start(console_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", cookie_jar=JAR()) as http:
        yield daemon, http
    await daemon.shutdown()


async def sign_in(http: aiohttp.ClientSession) -> dict[str, str]:
    async with http.post("/console/api/session", json={"token": TOKEN}) as response:
        assert response.status == 200
        body = await response.json()
        cookie = response.cookies["inspectd_console"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
    return {"X-CSRF-Token": body["csrf"]}


async def listen_for_frames(http: aiohttp.ClientSession, n: int, into: list[dict]) -> None:
    """Read the live feed (Server-Sent Events) until ``n`` frame events arrived into ``into``."""
    async with http.get("/console/api/events") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = None
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "frame":
                into.append(json.loads(line.split(":", 1)[1]))
                if len(into) == n:
                    return


async def test_reads_and_writes_need_a_session_and_its_csrf_token(console, redis_client, key_prefix,
                                                                  caplog) -> None:  # noqa: ANN001
    daemon, http = console
    await send(redis_client, key_prefix, DEFECTS[:1])
    await wait_until(lambda: daemon.review.items(), what="a kept frame")
    item = daemon.review.items()[0]
    for path in ("/console/api/overview", "/console/api/frames", f"/console/api/frames/{item.id}/image.png",
                 "/console/api/events", "/console/api/feedback"):
        async with http.get(path) as response:  # a token is configured: reads need a session too
            assert response.status == 401, path
    async with http.get("/console/") as response:  # the page itself (the sign-in form) loads
        assert response.status == 200
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    async with http.post("/console/api/session", json={"token": "guess"}) as response:
        assert response.status == 401
    feedback = f"/console/api/frames/{item.id}/feedback"
    csrf = await sign_in(http)
    async with http.get("/console/api/overview") as response:  # the cookie alone reads
        assert response.status == 200
    attacks = [
        ({}, "cookie without the CSRF header (a form post from another page)", 401),
        ({"X-CSRF-Token": "forged"}, "a forged CSRF token", 401),
        ({**csrf, "Origin": "http://evil.example"}, "a foreign Origin", 403),
    ]
    for headers, why, status in attacks:
        async with http.post(feedback, json={"action": "defect"}, headers=headers) as response:
            assert response.status == status, why
    async with http.post(feedback, data="action=defect", headers={**csrf, "Content-Type": "text/plain"}) as response:
        assert response.status == 415
    assert not (Path(daemon.feedback.root) / "nut").exists()  # none of them wrote anything
    assert TOKEN not in caplog.text  # the token is never logged
    async with http.post(feedback, json={"action": "defect"}, headers=csrf) as response:
        assert response.status == 201
    async with http.delete("/console/api/session", headers=csrf) as response:
        assert response.status == 200
    async with http.post(feedback, json={"action": "defect"}, headers=csrf) as response:
        assert response.status == 401  # signed out: the old CSRF token is worth nothing


async def test_bearer_token_works_for_scripts_and_reads_are_open_on_loopback_without_one(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client, console) -> None:  # noqa: ANN001
    daemon, http = console
    async with http.get("/console/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
    other = await start(console_config(redis_url, key_prefix + "b", tmp_path / "b", token=None), tiny_backbone)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{other.http_port}") as open_http:
            async with open_http.get("/console/api/overview") as response:
                assert response.status == 200  # loopback, no configured token: reads open as in the admin API
            async with open_http.post("/console/api/feedback/x/undo", json={}) as response:
                assert response.status == 401  # writes never are
    finally:
        await other.shutdown()


async def test_review_buffer_is_bounded_ng_first_and_carries_the_pictures(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    config = console_config(redis_url, key_prefix, tmp_path, keep_ng=3, keep_ok=2, max_side=128)
    config.products[1].threshold.value = 1e9  # grid: every frame OK
    daemon = await start(config, tiny_backbone)
    try:
        ids = await send(redis_client, key_prefix, DEFECTS[:4] + GOODS[:2], size=300)
        ok_ids = await send(redis_client, key_prefix, GOODS[:3], product="grid", line="l2", tag="g")
        await wait_until(lambda: sum(s.scored for s in daemon.review.stats.values()) >= 9, what="9 scored")
        newest = {ids[-1], ok_ids[-1]}
        await wait_until(lambda: newest <= {i.result["frame_id"] for i in daemon.review.items()}, what="all rendered")
        items = daemon.review.items()
        verdicts = [i.result["verdict"] for i in items]
        assert verdicts == ["NG", "NG", "NG", "OK", "OK"]  # NG first, bounded per verdict
        assert [i.result["frame_id"] for i in items[:3]] == ids[3:6][::-1]  # the newest NG, newest first
        assert [i.result["frame_id"] for i in items[3:]] == ok_ids[1:][::-1]
        image = Image.open(__import__("io").BytesIO(items[0].image_png))
        assert max(image.size) == 128  # downscaled to console.max_side
        assert daemon.metrics.review_frames._value.get() == 5
        stats = daemon.review.product_stats("nut")
        assert stats["last_n"] == 6 and stats["ng_last_n"] == 6 and stats["ng_rate_hour"] == 1.0
        assert daemon.review.product_stats("grid")["ng_rate_last_n"] == 0.0
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.get("/console/api/frames", params={"line": "l2"}) as response:
                frames = (await response.json())["frames"]
            assert [f["frame_id"] for f in frames] == ok_ids[1:][::-1]
            for kind, fmt in (("thumb.jpg", "JPEG"), ("overlay.jpg", "JPEG"), ("mask.png", "PNG"),
                              ("image.png", "PNG")):
                async with http.get(f"/console/api/frames/{items[0].id}/{kind}") as response:
                    assert response.status == 200, kind
                    assert Image.open(__import__("io").BytesIO(await response.read())).format == fmt
            async with http.get(f"/console/api/frames/{items[3].id}/mask.png") as response:
                assert response.status == 404  # grid publishes no mask
    finally:
        await daemon.shutdown()


async def test_review_off_keeps_no_image(redis_url, key_prefix, tmp_path, tiny_backbone,
                                         redis_client) -> None:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="off"), tiny_backbone)
    try:
        assert not daemon.engine.keep_payload  # the frames' bytes are dropped once scored
        await send(redis_client, key_prefix, DEFECTS[:2])
        await wait_until(lambda: daemon.review.stats.get("nut") and daemon.review.stats["nut"].scored == 2,
                         what="2 scored")
        assert daemon.review.items() == [] and daemon.review.product_stats("nut")["ng_last_n"] == 2
    finally:
        await daemon.shutdown()


async def test_a_daemon_without_its_http_server_renders_no_review_picture(redis_url, key_prefix, tmp_path,
                                                                          tiny_backbone, redis_client) -> None:  # noqa: ANN001
    """Nobody can open its console: no frame is kept or rendered (CPU the engine needs), verdicts still count; with
    console.review: redis the pictures go to Redis for the other instances' consoles, so it keeps them."""
    config = console_config(redis_url, key_prefix, tmp_path)
    config.http.enabled = False
    daemon = await start(config, tiny_backbone)
    try:
        assert not daemon.review.keeping and not daemon.engine.keep_payload
        await send(redis_client, key_prefix, DEFECTS[:2])
        await wait_until(lambda: daemon.review.stats.get("nut") and daemon.review.stats["nut"].scored == 2,
                         what="2 scored")
        await asyncio.sleep(0.3)  # a render queued would have finished by now
        assert daemon.review.items() == [] and daemon.review.product_stats("nut")["ng_last_n"] == 2
    finally:
        await daemon.shutdown()
    shared = console_config(redis_url, key_prefix, tmp_path, review="redis")
    shared.http.enabled = False
    assert review.ReviewHub(shared.console, served=False).keeping


async def test_live_events_stream_frames_as_they_are_scored(console, redis_client, key_prefix) -> None:  # noqa: ANN001
    daemon, http = console
    await sign_in(http)
    seen: list[dict] = []
    task = asyncio.create_task(listen_for_frames(http, 3, seen))
    await asyncio.sleep(0.3)
    ids = await send(redis_client, key_prefix, DEFECTS[:3])
    await asyncio.wait_for(task, 30)
    assert sorted(f["frame_id"] for f in seen) == sorted(ids)
    assert {f["verdict"] for f in seen} == {"NG"} and all(f["score"] >= f["threshold"] for f in seen)


async def test_false_alarm_into_references_and_holdout_rebuilds_and_undo_restores(
        console, redis_client, key_prefix) -> None:  # noqa: ANN001
    daemon, http = console
    csrf = await sign_in(http)
    await send(redis_client, key_prefix, DEFECTS[:2])
    await wait_until(lambda: len(daemon.review.items()) == 2, what="2 kept")
    first, second = daemon.review.items()
    before = daemon.registry.get("nut")
    async with http.post(f"/console/api/frames/{first.id}/feedback", headers=csrf,
                         json={"action": "false_alarm", "target": "references"}) as response:
        assert response.status == 201, await response.text()
        body = await response.json()
    after = daemon.registry.get("nut")
    assert after.version == before.version + 1 and body["product"]["version"] == after.version
    assert after.config.shots == 3 and len(after.references) == 3  # the new reference is used
    saved = Path(after.config.references) / after.references[-1]
    assert saved.name.startswith("fb-") and np.array_equal(
        np.asarray(Image.open(saved)), np.asarray(Image.open(__import__("io").BytesIO(first.image_png))))
    assert body["product"]["threshold"] == pytest.approx(after.threshold) and after.threshold != before.threshold
    product_file = Path(daemon.config.registry.products_dir) / "nut.yaml"
    assert "shots: 3" in product_file.read_text()  # persisted: a restart keeps it

    async with http.put("/console/api/products/nut/feedback-target", headers=csrf, json={"target": "holdout"}
                        ) as response:  # the operator's choice for this product, kept by the daemon
        assert response.status == 200 and (await response.json())["feedback_target"] == "holdout"
    async with http.post(f"/console/api/frames/{second.id}/feedback", headers=csrf,
                         json={"action": "false_alarm"}) as response:
        assert response.status == 201, await response.text()
    held = daemon.registry.get("nut")
    assert held.version == after.version + 1 and held.config.threshold.holdout_dir
    assert len(list(Path(held.config.threshold.holdout_dir).glob("fb-*.png"))) == 1
    assert held.calibration != after.calibration  # the holdout image is among the calibration scores

    metric = daemon.metrics.console_feedback.labels(product="nut", action="false_alarm")._value.get()
    assert metric == 2
    async with http.get("/console/api/feedback") as response:
        log = (await response.json())["feedback"]
    assert [r["action"] for r in log] == ["false_alarm", "false_alarm"]
    for record in reversed(log):
        async with http.post(f"/console/api/feedback/{record['id']}/undo", headers=csrf) as response:
            assert response.status == 200, await response.text()
    restored = daemon.registry.get("nut")
    assert restored.config.shots == 2 and restored.config.threshold.holdout_dir is None
    assert restored.references == before.references and restored.threshold == pytest.approx(before.threshold)
    assert not saved.exists()
    async with http.post(f"/console/api/feedback/{log[0]['id']}/undo", headers=csrf) as response:
        assert response.status == 409  # undone once
    async with http.get("/console/api/feedback") as response:
        assert all(r["undone"] for r in (await response.json())["feedback"])


async def test_confirmed_defect_lands_in_the_folder_eval_layout(console, redis_client, key_prefix, tiny_checkpoint,
                                                               tmp_path) -> None:  # noqa: ANN001
    daemon, http = console
    csrf = await sign_in(http)
    await send(redis_client, key_prefix, DEFECTS[:3])
    await wait_until(lambda: len(daemon.review.items()) == 3, what="3 kept")
    *confirmed, spare = daemon.review.items()
    for item in confirmed:
        async with http.post(f"/console/api/frames/{item.id}/feedback", headers=csrf,
                             json={"action": "defect", "label": "colour"}) as response:
            assert response.status == 201, await response.text()
    async with http.post(f"/console/api/frames/{item.id}/feedback", headers=csrf,
                         json={"action": "defect", "label": "colour"}) as response:
        assert response.status == 409  # a double tap: feedback once per frame (undo first)
    async with http.post(f"/console/api/frames/{spare.id}/feedback", headers=csrf,
                         json={"action": "defect", "label": "../x"}) as response:
        assert response.status == 400  # a label is a folder name, never a path
    (category,) = open_dataset(daemon.feedback.root, "folder")
    assert category.name == "nut"
    defects = [s for s in category.test if s.label == 1]
    assert len(defects) == 2 and all(s.mask_path is not None for s in defects)
    assert {s.defect_type for s in defects} == {"colour"}
    assert len(category.train) == 2  # good/ was seeded with the product's references
    mask = np.asarray(Image.open(defects[0].mask_path))
    assert mask.shape == (160, 160) and set(np.unique(mask)) <= {0, 255}
    assert daemon.metrics.console_feedback.labels(product="nut", action="defect")._value.get() == 2
    # ... and `inspectd eval --dataset folder` measures on it
    from inspectd.cli import main

    out = tmp_path / "eval"
    args = ["eval", "--dataset", "folder", "--root", str(daemon.feedback.root), "--detector", "winclip",
            "--shots", "1", "--weights", str(tiny_checkpoint), "--out", str(out), "--eval-size", "128"]
    assert await asyncio.to_thread(main, args) == 0
    rows = {(r["category"], r["metric"]): r for r in json.loads((out / "winclip_1shot.json").read_text())["results"]}
    assert rows[("nut", "image_auroc")]["mean"] is not None and rows[("nut", "pixel_auroc")]["mean"] is not None


async def test_a_defect_saved_without_its_original_has_a_mask_the_size_of_its_image(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    config = console_config(redis_url, key_prefix, tmp_path, keep_original=False, max_side=64)
    daemon = await start(config, tiny_backbone)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", cookie_jar=JAR()) as http:
            csrf = await sign_in(http)
            await send(redis_client, key_prefix, DEFECTS[:1])  # 160 px frames, kept at 64 px for review
            await wait_until(lambda: len(daemon.review.items()) == 1, what="1 kept")
            (item,) = daemon.review.items()
            assert item.original is None and item.result["frame_size"] == [160, 160]
            async with http.post(f"/console/api/frames/{item.id}/feedback", headers=csrf,
                                 json={"action": "defect", "label": "colour"}) as response:
                assert response.status == 201, await response.text()
        (category,) = open_dataset(daemon.feedback.root, "folder")
        (defect,) = [s for s in category.test if s.label == 1]
        image, mask = Image.open(defect.image_path), Image.open(defect.mask_path)
        assert image.size == mask.size == (64, 64)  # the review image is what was saved, and its mask fits it
    finally:
        await daemon.shutdown()


async def test_false_alarm_never_writes_outside_references_root(redis_url, key_prefix, tmp_path, tiny_backbone,
                                                                redis_client) -> None:  # noqa: ANN001
    config = console_config(redis_url, key_prefix, tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    config.registry.references_root = str(root)  # the product's references (tmp/refs) lie outside it
    daemon = await start(config, tiny_backbone)
    try:
        original = sorted(p.name for p in (tmp_path / "refs").iterdir())
        await send(redis_client, key_prefix, GOODS[:1])
        await wait_until(lambda: daemon.review.items(), what="a kept frame")
        record = await daemon.feedback.false_alarm(daemon.review.items()[0], "references", "test")
        entry = daemon.registry.get("nut")
        assert Path(entry.config.references) == root / "nut"
        assert sorted(p.name for p in (tmp_path / "refs").iterdir()) == original  # untouched
        assert entry.references[:2] == tuple(original) and entry.references[2].startswith("fb-")
        await daemon.feedback.undo(record["id"], "test")
        assert daemon.registry.get("nut").config.references == str(tmp_path / "refs")
    finally:
        await daemon.shutdown()


async def test_a_holdout_the_console_makes_is_no_other_products_folder(console, redis_client, key_prefix,
                                                                       tmp_path) -> None:  # noqa: ANN001
    import copy

    from tests.daemon_helpers import png_bytes

    daemon, http = console
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    form = aiohttp.FormData()  # product `nut-holdout`, created the documented way: images in <root>/nut-holdout/
    form.add_field("config", "object_name: hazelnut\nshots: 5\n", content_type="application/yaml")
    form.add_field("files", png_bytes(DEFECTS[0], 160), filename="other.png", content_type="image/png")
    async with http.put("/products/nut-holdout", data=form, headers=bearer) as response:
        assert response.status == 201, await response.text()
    other = Path(daemon.registry.get("nut-holdout").config.references)
    await send(redis_client, key_prefix, GOODS[:2])
    await wait_until(lambda: len(daemon.review.items()) == 2, what="2 kept")
    first, second = daemon.review.items()
    await daemon.feedback.false_alarm(first, "holdout", "test")
    holdout = Path(daemon.registry.get("nut").config.threshold.holdout_dir)
    assert holdout == tmp_path / "_console" / "_holdout" / "nut"  # ids never start with "_": no product's folder
    assert holdout.resolve() != other.resolve() and sorted(p.name for p in other.iterdir()) == ["other.png"]
    assert len(list(holdout.glob("fb-*.png"))) == 1

    twin = copy.deepcopy(daemon.registry.get("nut").config)  # a product set (over the API) to use nut's holdout
    twin.id = "twin"
    await daemon.registry.put(twin)
    with pytest.raises(Exception) as err:
        await daemon.feedback.false_alarm(second, "holdout", "test")
    assert getattr(err.value, "status", None) == 409 and "'twin'" in str(err.value)
    assert len(list(holdout.glob("fb-*.png"))) == 1  # nothing written


async def test_a_false_alarm_never_switches_on_references_the_product_leaves_out(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    from tests.daemon_helpers import png_bytes

    config = console_config(redis_url, key_prefix, tmp_path)
    refs = tmp_path / "refs"
    for i, path in enumerate(DEFECTS[:3]):  # in the folder, left out on purpose (shots: 2 uses 00, 01)
        (refs / f"{10 + i}.png").write_bytes(png_bytes(path, 160))
    daemon = await start(config, tiny_backbone)
    try:
        before = daemon.registry.get("nut")
        await send(redis_client, key_prefix, GOODS[2:4])
        await wait_until(lambda: len(daemon.review.items()) == 2, what="2 kept")
        first, second = daemon.review.items()
        record = await daemon.feedback.false_alarm(first, "references", "test")
        entry = daemon.registry.get("nut")
        assert entry.config.shots == 3 and entry.references[:2] == before.references == ("00.png", "01.png")
        assert entry.references[2].startswith("fb-") and len(entry.references) == 3  # 10..12.png stay out
        assert Path(entry.config.references) == tmp_path / "_console" / "_references" / "nut"  # a copy
        assert sorted(p.name for p in refs.iterdir()) == ["00.png", "01.png", "10.png", "11.png", "12.png"]
        assert "shots: 3" in (tmp_path / "products" / "nut.yaml").read_text()
        again = await daemon.feedback.false_alarm(second, "references", "test")  # the copy is a plain folder now
        assert daemon.registry.get("nut").config.shots == 4
        for done in (again, record):
            await daemon.feedback.undo(done["id"], "test")
        restored = daemon.registry.get("nut")
        assert restored.config.references == str(refs) and restored.config.shots == 2
        assert restored.references == before.references
    finally:
        await daemon.shutdown()


async def test_review_in_redis_is_capped_shared_by_instances_and_holds_no_image_in_memory(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    scorer = await start(console_config(redis_url, key_prefix, tmp_path / "a", review="redis", keep_ng=3),
                         tiny_backbone)
    viewer_config = console_config(redis_url, key_prefix, tmp_path / "b", review="redis", keep_ng=3)
    viewer_config.sources.redis = False  # scores nothing itself: everything it shows comes from the scorer
    viewer = await start(viewer_config, tiny_backbone)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{viewer.http_port}", cookie_jar=JAR()) as http:
            csrf = await sign_in(http)
            heard: list[dict] = []
            task = asyncio.create_task(listen_for_frames(http, 5, heard))
            await asyncio.sleep(0.5)
            ids = await send(redis_client, key_prefix, DEFECTS[:4] + GOODS[:1])
            await asyncio.wait_for(task, 30)  # the viewer's page hears the scorer's frames live
            assert [f["frame_id"] for f in heard] == ids
            key = f"{key_prefix}:{{console}}:review:NG"
            assert await redis_client.xlen(key) == 3  # capped by MAXLEN = keep_ng
            async with http.get("/console/api/frames") as response:
                frames = (await response.json())["frames"]
            assert [f["frame_id"] for f in frames] == ids[2:][::-1]
            async with http.get(f"/console/api/frames/{frames[0]['id']}/overlay.jpg") as response:
                assert response.status == 200
                assert Image.open(__import__("io").BytesIO(await response.read())).format == "JPEG"
            async with http.post(f"/console/api/frames/{frames[0]['id']}/feedback", headers=csrf,
                                 json={"action": "defect", "label": "colour"}) as response:
                assert response.status == 201, await response.text()
            (category,) = open_dataset(viewer.feedback.root, "folder")
            assert [s.mask_path is not None for s in category.test if s.label == 1] == [True]
            async with http.get("/console/api/frames") as response:
                marked = (await response.json())["frames"][0]
            assert marked["feedback"]["action"] == "defect"
        async with aiohttp.ClientSession(f"http://127.0.0.1:{scorer.http_port}", cookie_jar=JAR()) as other:
            csrf_other = await sign_in(other)  # an operator at the other instance's console sees the mark ...
            async with other.get("/console/api/frames") as response:
                assert (await response.json())["frames"][0]["feedback"]["action"] == "defect"
            async with other.post(f"/console/api/frames/{frames[0]['id']}/feedback", headers=csrf_other,
                                  json={"action": "defect", "label": "colour"}) as response:
                assert response.status == 409  # ... and cannot act on that frame a second time
        assert scorer.review._items == {} and viewer.review._items == {}  # no review image in either process
    finally:
        await viewer.shutdown()
        await scorer.shutdown()


async def test_feedback_saves_the_frame_as_scored_and_two_false_alarms_undo_independently(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    config = console_config(redis_url, key_prefix, tmp_path, max_side=128)
    config.registry.watch = True  # the watcher sees our own writes and rebuilds meanwhile: nothing may be lost
    config.registry.debounce_s = 0.05
    daemon = await start(config, tiny_backbone)
    try:
        from tests.daemon_helpers import png_bytes

        await send(redis_client, key_prefix, GOODS[:2], size=300)
        await wait_until(lambda: len(daemon.review.items()) == 2, what="2 kept")
        second, first = daemon.review.items()  # newest first
        one = await daemon.feedback.false_alarm(first, "references", "test")
        two = await daemon.feedback.false_alarm(second, "references", "test")
        entry = daemon.registry.get("nut")
        assert entry.config.shots == 4 and len(entry.references) == 4  # both new references are used
        saved = Path(one["files"][0])
        assert saved.read_bytes() == png_bytes(GOODS[0], 300)  # the frame as sent, not the 128 px review copy
        assert Image.open(saved).size == (300, 300)
        await daemon.feedback.undo(one["id"], "test")
        entry = daemon.registry.get("nut")
        assert entry.config.shots == 3 and Path(two["files"][0]).name in entry.references
        assert not saved.exists()
        await asyncio.sleep(0.3)  # let the watcher catch up with the undo's own deletes
        assert (await daemon.registry.settled("nut")).config.shots == 3
    finally:
        await daemon.shutdown()


async def test_made_up_products_share_one_stats_entry_and_skipped_lines_keep_no_frame(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, skip_lines=["l2"]), tiny_backbone)
    try:
        for i in range(30):
            await send(redis_client, key_prefix, DEFECTS[:1], product=f"evil-{i}", tag=f"e{i}")
        await send(redis_client, key_prefix, DEFECTS[:2], line="l2", tag="private")
        await wait_until(lambda: daemon.review.stats.get("_unknown") is not None
                         and sum(daemon.review.stats["_unknown"].dead.values()) == 30, what="30 dead letters")
        await wait_until(lambda: daemon.review.stats.get("nut") is not None and daemon.review.stats["nut"].scored == 2,
                         what="2 scored")
        assert set(daemon.review.stats) == {"_unknown", "nut"}
        assert daemon.review.items() == []  # line l2 keeps no frame
    finally:
        await daemon.shutdown()


async def test_a_forged_review_entry_in_redis_cannot_steer_feedback_out_of_its_folder(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    from inspectd.daemon.review import ReviewItem

    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    outside = tmp_path / "outside"
    try:
        forged = ReviewItem("x", {"product": str(outside), "line": "l1", "frame_id": "f", "entry_id": "",
                                  "ts": 1e300, "score": 1.0, "threshold": 0.5, "verdict": "NG", "detector": "winclip",
                                  "state_version": "1", "demo_weights": True, "size": [8, 8]},
                            b"png", b"jpg", b"jpg", None, None)
        entry_id = await daemon.review.store.add(forged)  # what anyone who may write to Redis could do
        item = await daemon.review.fetch(entry_id)
        assert item is not None
        for action in (daemon.feedback.defect(item, "x", "test"), daemon.feedback.false_alarm(item, "holdout", "t")):
            with pytest.raises(Exception) as err:
                await action
            assert getattr(err.value, "status", None) == 409
        assert not outside.exists()
    finally:
        await daemon.shutdown()


async def test_the_live_stream_ends_with_the_session(console, redis_client, key_prefix) -> None:  # noqa: ANN001
    daemon, http = console
    csrf = await sign_in(http)
    async with http.get("/console/api/events") as response:
        await response.content.readline()  # the stream is open
        async with http.delete("/console/api/session", headers=csrf) as bye:
            assert bye.status == 200
        await send(redis_client, key_prefix, DEFECTS[:1])
        rest = await asyncio.wait_for(response.content.read(), 20)  # the server closes it
    assert b"event: frame" not in rest


async def test_review_rendering_is_rate_limited_and_counted(redis_url, key_prefix, tmp_path, tiny_backbone,
                                                            redis_client, monkeypatch) -> None:  # noqa: ANN001
    config = console_config(redis_url, key_prefix, tmp_path, ng_per_s=2.0, ok_per_s=0.0)
    config.products[1].threshold.value = 1e9  # grid: OK
    review_images = []  # frames shrunk to the review size: only those rendered, not every frame at decode
    real_downscale = review.downscale

    def counting_downscale(image, max_side):  # noqa: ANN001, ANN202
        if max_side == config.console.max_side and image.dtype == np.uint8:
            review_images.append(image.shape)
        return real_downscale(image, max_side)

    for module in ("inspectd.daemon.review", "inspectd.daemon.engine"):  # the engine did it before the fix
        monkeypatch.setattr(f"{module}.downscale", counting_downscale, raising=False)
    daemon = await start(config, tiny_backbone)
    try:
        await send(redis_client, key_prefix, DEFECTS[:4] * 3)  # 12 NG frames in a burst
        await send(redis_client, key_prefix, GOODS[:3], product="grid", line="l2", tag="g")
        await wait_until(lambda: sum(s.scored for s in daemon.review.stats.values()) == 12 + 3,
                         what=f"15 scored {[(k, v.scored, dict(v.dead)) for k, v in daemon.review.stats.items()]}")
        skipped = daemon.metrics.review_skipped
        ng_skipped = skipped.labels(verdict="NG", reason="rate")
        # every NG frame is either skipped at once or kept once rendered: then no render is still under way
        await wait_until(lambda: ng_skipped._value.get() + len(daemon.review.items()) == 12, what="12 NG handled")
        kept = daemon.review.items()
        assert 2 <= len(kept) <= 4 and {i.result["verdict"] for i in kept} == {"NG"}  # burst 2 (+ refill)
        assert skipped.labels(verdict="NG", reason="rate")._value.get() == 12 - len(kept)
        assert skipped.labels(verdict="OK", reason="rate")._value.get() == 3
        assert len(review_images) == len(kept)
    finally:
        await daemon.shutdown()
