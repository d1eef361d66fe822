"""No input can wedge the daemon (real Redis): bad or foreign line ids, unpublishable results, thin images,
oversized meta, made-up product names as metric labels, and liveness when publishing stalls."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.publisher import Publisher, source_line
from inspectd.streams.message import frame_fields
from inspectd.streams.reasons import REASONS, Reason
from inspectd.streams.redis_keys import StreamKeys
from inspectd.streams.redis_sink import RedisResultSink
from inspectd.streams.schema import VERDICT_OK, Result
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, read_stream

pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[1]


def one_line_config(redis_url: str, prefix: str, tmp: Path, **over):  # noqa: ANN003, ANN201
    config = daemon_config(redis_url, prefix, tmp, registry={"watch": False},
                           redis={"url": redis_url, "prefix": prefix, "lines": ["l1"], "block_ms": 50,
                                  "control_stream": None}, **over)
    config.products = [p for p in config.products if p.id == "grid"]  # zero-shot: quick to build
    return config


async def wait_for(client, keys: list[str], n: int, timeout: float = 30) -> list[dict]:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        records = [r for key in keys for r in await read_stream(client, key)]
        if len(records) >= n or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- 1. lines
async def test_bad_and_foreign_lines_are_dead_letters_and_never_wedge_the_publisher(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    daemon = InspectDaemon(one_line_config(redis_url, key_prefix, tmp_path), backbone=tiny_backbone)
    await daemon.start()
    keys = StreamKeys(key_prefix)
    try:
        good = png_bytes(HAZELNUT / "good" / "03.png")
        frames = keys.frames("l1")
        await redis_client.xadd(frames, frame_fields("grid", "l1", "ok-1", good))
        await redis_client.xadd(frames, frame_fields("grid", "bad line", "bad", good))  # wedged the publisher
        await redis_client.xadd(frames, frame_fields("grid", "l2", "foreign", good))  # another line's stream
        await redis_client.xadd(frames, frame_fields("grid", "{l9}", "braces", good))
        for i in range(5):
            await redis_client.xadd(frames, frame_fields("grid", "l1", f"ok-{i + 2}", good))
        results = await wait_for(redis_client, [keys.results("l1")], 6)
        dead = await wait_for(redis_client, [keys.dead("l1")], 3)
        assert sorted(r["frame_id"] for r in results) == [f"ok-{i}" for i in range(1, 7)]
        assert {d["frame_id"]: d["reason"] for d in dead} == {"bad": "bad_line", "foreign": "bad_line",
                                                               "braces": "bad_line"}
        assert "stream it was read from" in next(d["detail"] for d in dead if d["frame_id"] == "foreign")
        assert await redis_client.xlen(keys.results("l2")) == 0  # a frame cannot write to another line
        assert daemon.healthy()
        pending = await redis_client.xpending(frames, daemon.config.redis.group)
        assert pending["pending"] == 0  # everything acked, nothing redelivered to wedge a restart
    finally:
        await daemon.shutdown()


async def test_a_permanently_refused_result_becomes_unpublishable_and_the_rest_publish(
        redis_client, key_prefix) -> None:
    from inspectd.daemon.metrics import Metrics

    keys = StreamKeys(key_prefix)
    sink = RedisResultSink(redis_client, keys)
    publisher = Publisher([sink], Metrics())

    def result(frame_id: str, line: str) -> Result:
        return Result(product="p", line=line, frame_id=frame_id, captured_at=1.0, score=0.1, verdict=VERDICT_OK,
                      threshold=0.5, detector="winclip", state_version="1",
                      source=f"redis:{keys.frames('l1')}", entry_id=f"{frame_id}-0")

    batch = [result("a", "l1"), result("b", "no such {line}"), result("c", "l1")]
    published, dead = await asyncio.wait_for(publisher.publish(batch, []), 10)
    assert [r.frame_id for r in published] == ["a", "c"]
    assert [(d.frame_id, d.reason, d.line) for d in dead] == [("b", Reason.UNPUBLISHABLE, "l1")]
    assert [r["frame_id"] for r in await read_stream(redis_client, keys.results("l1"))] == ["a", "c"]
    [letter] = await read_stream(redis_client, keys.dead("l1"))
    assert letter["reason"] == "unpublishable" and "invalid line id" in letter["detail"]
    assert source_line("redis:inspect:{l7}:frames") == "l7" and source_line("camera:0") == ""


class BlipOnce:
    """A real sink whose ``fail_on``-th publish fails with a connection reset (a failover, a network blip)."""

    def __init__(self, inner: RedisResultSink, fail_on: int) -> None:
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    async def publish_batch(self, results, dead=()):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls == self.fail_on:
            raise RedisConnectionError("Connection reset by peer")
        return await self.inner.publish_batch(results, dead)


async def test_a_connection_blip_while_isolating_a_refused_item_is_retried_not_fatal(redis_client,
                                                                                     key_prefix) -> None:
    """The isolation ran outside publish()'s retry loop: a transient error in it escaped, ended the daemon's
    publish task, and nothing was published or acked again until a restart."""
    from inspectd.daemon.metrics import Metrics

    keys = StreamKeys(key_prefix)
    sink = BlipOnce(RedisResultSink(redis_client, keys), fail_on=2)  # the whole batch, then the first item alone
    publisher = Publisher([sink], Metrics())
    batch = [_result(keys, "a", "l1"), _result(keys, "b", "no such {line}"), _result(keys, "c", "l1")]
    published, dead = await asyncio.wait_for(publisher.publish(batch, []), 10)
    assert [r.frame_id for r in published] == ["a", "c"]
    assert [(d.frame_id, d.reason) for d in dead] == [("b", Reason.UNPUBLISHABLE)]
    assert sorted(r["frame_id"] for r in await read_stream(redis_client, keys.results("l1"))) == ["a", "c"]


async def test_an_unencodable_frame_id_still_gets_a_published_dead_letter(redis_client, key_prefix) -> None:
    """A lone surrogate (a non-UTF-8 file name) made the result unpublishable and its replacement dead letter,
    carrying the same id, unpublishable too: the frame was acked with only a log line to show for it."""
    from inspectd.daemon.metrics import Metrics

    keys = StreamKeys(key_prefix)
    publisher = Publisher([RedisResultSink(redis_client, keys)], Metrics())
    published, dead = await asyncio.wait_for(publisher.publish([_result(keys, "Pr\udcfcfteil.png", "l1")], []), 10)
    assert published == [] and [d.reason for d in dead] == [Reason.UNPUBLISHABLE]
    [letter] = await read_stream(redis_client, keys.dead("l1"))
    # escaped as the folder source escapes that name (tests/test_streams_folder.py): one name, one id
    assert letter["frame_id"] == "Pr\\xfcfteil.png" and "UnicodeEncodeError" in letter["detail"]
    assert publisher.unpublishable == 1


def _result(keys: StreamKeys, frame_id: str, line: str) -> Result:
    return Result(product="p", line=line, frame_id=frame_id, captured_at=1.0, score=0.1, verdict=VERDICT_OK,
                  threshold=0.5, detector="winclip", state_version="1", source=f"redis:{keys.frames('l1')}",
                  entry_id=f"{len(frame_id)}-0")


async def test_an_entry_that_breaks_the_parser_is_dead_lettered_and_its_neighbours_scored(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    """Deeply nested `meta` raised RecursionError out of the source's read: the reply was dropped, the read
    retried for ever and none of the six entries read with it got a result or a dead letter."""
    daemon = InspectDaemon(one_line_config(redis_url, key_prefix, tmp_path), backbone=tiny_backbone)
    await daemon.start()
    keys = StreamKeys(key_prefix)
    try:
        good = png_bytes(HAZELNUT / "good" / "03.png")
        frames = keys.frames("l1")
        for i in range(2):
            await redis_client.xadd(frames, frame_fields("grid", "l1", f"ok-{i}", good))
        await redis_client.xadd(frames, {"product": "grid", "frame_id": "deep", "image": good, "meta": "[" * 20000})
        await redis_client.xadd(frames, {"product": "grid", "frame_id": "inf", "image": good, "shape": "[1e999,3]"})
        for i in range(2, 5):
            await redis_client.xadd(frames, frame_fields("grid", "l1", f"ok-{i}", good))
        results = await wait_for(redis_client, [keys.results("l1")], 5)
        dead = await wait_for(redis_client, [keys.dead("l1")], 2)
        assert sorted(r["frame_id"] for r in results) == [f"ok-{i}" for i in range(5)]
        assert {d["frame_id"]: d["reason"] for d in dead} == {"deep": "bad_meta", "inf": "bad_shape"}
        assert (await redis_client.xpending(frames, daemon.config.redis.group))["pending"] == 0
    finally:
        await daemon.shutdown()


async def test_shutdown_during_a_burst_of_bad_entries_hands_every_read_entry_on(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    """A reader that had returned from its read and was handing a dead letter to the (2-deep) publish queue
    counted as "not reading" and was cancelled: the rest of its entries never entered the pipeline, shutdown
    waited out shutdown_timeout_s and exited 3 with them pending, though nothing was slow."""
    keys = StreamKeys(key_prefix)
    frames = keys.frames("l1")
    pipe = redis_client.pipeline(transaction=False)
    for i in range(3000):
        pipe.xadd(frames, {"frame_id": f"bad{i}", "image": b"x"})  # no product: a parse dead letter each
    await pipe.execute()
    daemon = InspectDaemon(one_line_config(redis_url, key_prefix, tmp_path, shutdown_timeout_s=5),
                           backbone=tiny_backbone)
    await daemon.start()
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await daemon.shutdown()
    assert daemon.left_pending == 0 and time.monotonic() - started < 4
    assert (await redis_client.xpending(frames, daemon.config.redis.group))["pending"] == 0
    assert 0 < daemon.frames_done == await redis_client.xlen(keys.dead("l1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)


async def until(predicate, timeout: float = 20.0, step: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return True
        except Exception:  # noqa: BLE001 - e.g. the server is not up yet
            pass
        await asyncio.sleep(step)
    return False


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start a private server")
async def test_liveness_fails_while_publishing_stalls_then_recovers_with_nothing_lost(tmp_path, tiny_backbone
                                                                                     ) -> None:
    import redis.asyncio as aioredis

    port = _free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.from_url(url)
    assert await until(client.ping)
    inbox = tmp_path / "in"
    (inbox / "grid").mkdir(parents=True)
    config = one_line_config(url, "stall", tmp_path, sinks={"publish_stall_s": 1.0, "redis": True},
                             sources={"redis": False, "folders": [{"path": str(inbox), "line": "l1",
                                                                   "poll_interval_s": 0.05}]})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    keys = StreamKeys("stall")
    try:
        (inbox / "grid" / "a.png").write_bytes(png_bytes(HAZELNUT / "good" / "03.png"))
        assert await until(lambda: _xlen(client, keys.results("l1"), 1))
        server.terminate()
        server.wait(timeout=10)
        (inbox / "grid" / "b.png").write_bytes(png_bytes(HAZELNUT / "good" / "04.png"))  # read, scored, unpublishable
        assert await until(lambda: _false(daemon.healthy), timeout=15), "liveness never failed"
        assert daemon.publisher.stalled_for() > 1.0
        server = start_redis(port, tmp_path)  # the outage ends
        assert await until(lambda: _xlen(client, keys.results("l1"), 1), timeout=30)  # the new server has b
        assert await until(lambda: _true(daemon.healthy))
        records = await read_stream(client, keys.results("l1"))
        assert [Path(json.loads(r["meta"])["path"]).name for r in records] == ["b.png"]
    finally:
        await daemon.shutdown()
        await client.aclose()
        server.terminate()
        server.wait(timeout=10)


async def _xlen(client, key: str, n: int) -> bool:  # noqa: ANN001
    return await client.xlen(key) >= n


async def _false(fn) -> bool:  # noqa: ANN001
    return not fn()


async def _true(fn) -> bool:  # noqa: ANN001
    return bool(fn())


# ----------------------------------------------------------------------------- 2. thin images, 6. meta
def thin_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_thin_images_and_oversized_meta_are_refused_without_blocking_others(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    daemon = InspectDaemon(one_line_config(redis_url, key_prefix, tmp_path, decode={"max_meta_bytes": 1024}),
                           backbone=tiny_backbone)
    await daemon.start()
    keys = StreamKeys(key_prefix)
    try:
        good = png_bytes(HAZELNUT / "good" / "03.png")
        frames = keys.frames("l1")
        started = time.monotonic()
        await redis_client.xadd(frames, frame_fields("grid", "l1", "strip", thin_png(10000, 10)))
        await redis_client.xadd(frames, frame_fields("grid", "l1", "long-strip", thin_png(100000, 10)))
        await redis_client.xadd(frames, frame_fields("grid", "l1", "fat-meta", good, meta={"x": "y" * 5000}))
        await redis_client.xadd(frames, frame_fields("grid", "l1", "wide-ok", thin_png(1200, 240)))  # 5 tiles: fine
        await redis_client.xadd(frames, frame_fields("grid", "l1", "ok", good, meta={"lot": 7}))
        results = await wait_for(redis_client, [keys.results("l1")], 2)
        dead = await wait_for(redis_client, [keys.dead("l1")], 3)
        took = time.monotonic() - started
        assert sorted(r["frame_id"] for r in results) == ["ok", "wide-ok"]
        reasons = {d["frame_id"]: d["reason"] for d in dead}
        assert reasons == {"strip": "too_many_tiles", "long-strip": "too_many_tiles", "fat-meta": "meta_too_large"}
        assert "decode.max_tiles" in next(d["detail"] for d in dead if d["frame_id"] == "strip")
        assert took < 15, f"{took:.1f} s: a thin image must be refused before it is resized"
        assert json.loads(next(r for r in results if r["frame_id"] == "ok")["meta"]) == {"lot": 7}
    finally:
        await daemon.shutdown()


# ----------------------------------------------------------------------------- 5. metric labels
async def test_made_up_product_names_do_not_become_metric_labels(redis_client, redis_url, key_prefix, tmp_path,
                                                               tiny_backbone) -> None:
    daemon = InspectDaemon(one_line_config(redis_url, key_prefix, tmp_path), backbone=tiny_backbone)
    await daemon.start()
    keys = StreamKeys(key_prefix)
    try:
        tiny = thin_png(8, 8)
        pipe = redis_client.pipeline(transaction=False)
        for i in range(300):
            pipe.xadd(keys.frames("l1"), frame_fields(f"made-up-{i}", "l1", f"x{i}", tiny))
        await pipe.execute()
        dead = await wait_for(redis_client, [keys.dead("l1")], 300, timeout=60)
        assert len(dead) == 300 and {d["reason"] for d in dead} == {"unknown_product"}
        text = daemon.metrics.exposition().decode()
        assert "made-up-" not in text
        assert 'inspectd_frames_received_total{line="l1",product="_unknown"} 300.0' in text
        assert len(text) < 40_000
    finally:
        await daemon.shutdown()


# ----------------------------------------------------------------------------- one enum, one table
def test_every_dead_letter_reason_is_in_the_enum_and_the_readme_table() -> None:
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^\| `([a-z_]+)` \| (?:parse|decode|product|score|publish) \|", readme, flags=re.M))
    assert table == {r.value for r in Reason}, table ^ {r.value for r in Reason}
    assert set(REASONS) == set(Reason)
    known = {r.value for r in Reason}
    used: set[str] = set()
    for path in (REPO / "inspectd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "reason" and isinstance(node.value, ast.Constant):
                used.add(node.value.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "dead", "_dead", "_fail") and node.args and isinstance(node.args[0], ast.Constant):
                used.add(node.args[0].value)
    assert used <= known, used - known  # no reason string outside the enum


# ----------------------------------------------------------------------------- 3. a web page cannot drive the API
@pytest.fixture
async def open_api(redis_url, key_prefix, tmp_path, tiny_backbone, monkeypatch):  # noqa: ANN001, ANN201
    """A daemon on loopback with no token configured (the default a new user runs)."""
    import aiohttp

    monkeypatch.delenv("INSPECTD_ADMIN_TOKEN", raising=False)
    config = daemon_config(redis_url, key_prefix, tmp_path, registry={"watch": False},
                           http={"enabled": True, "host": "127.0.0.1", "port": 0,
                                 "token_file": str(tmp_path / "state" / "admin-token")})
    config.products = [p for p in config.products if p.id == "nut"]
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    session = aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}")
    yield daemon, session, tmp_path
    await session.close()
    await daemon.shutdown()


async def test_a_cross_site_form_post_cannot_replace_references(open_api) -> None:  # noqa: ANN001
    import aiohttp

    daemon, session, tmp = open_api
    refs = tmp / "refs"
    before = sorted(p.name for p in refs.iterdir())
    form = aiohttp.FormData()
    form.add_field("file", thin_png(64, 64), filename="defect.png", content_type="image/png")
    # what a page on another site makes the operator's browser send: a simple multipart POST, its Origin, no token
    async with session.post("/products/nut/references?replace=true", data=form,
                            headers={"Origin": "http://evil.example"}) as response:
        assert response.status == 403
    form2 = aiohttp.FormData()
    form2.add_field("file", thin_png(64, 64), filename="defect.png", content_type="image/png")
    async with session.post("/products/nut/references?replace=true", data=form2) as response:
        assert response.status == 401  # no Origin (e.g. a local script): still needs the token
    assert sorted(p.name for p in refs.iterdir()) == before and daemon.registry.get("nut").version == 1


async def test_dns_rebinding_cannot_read_or_write(open_api) -> None:  # noqa: ANN001
    daemon, session, _ = open_api
    token = (Path(daemon.config.http.token_file)).read_text().strip()
    rebound = {"Host": f"evil.example:{daemon.http_port}"}
    async with session.put("/products/nut", json={"threshold": {"value": 99}},
                           headers={**rebound, "Authorization": f"Bearer {token}"}) as response:
        assert response.status == 421
    async with session.get("/products", headers=rebound) as response:
        assert response.status == 421  # no config leaks either
    assert daemon.registry.get("nut").threshold != 99
    async with session.get("/products") as response:  # a loopback Host reads
        assert response.status == 200


async def test_writes_need_the_generated_token_and_a_non_simple_body(open_api) -> None:  # noqa: ANN001
    daemon, session, _ = open_api
    path = Path(daemon.config.http.token_file)
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    body = {"object_name": "hazelnut", "references": str(path.parents[1] / "refs"), "shots": 2,
            "threshold": {"value": 0.9}}
    async with session.put("/products/nut", json=body) as response:
        assert response.status == 401
    async with session.put("/products/nut", data=json.dumps(body),
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}) as response:
        assert response.status == 415  # a form's simple content type is not a write body
    async with session.put("/products/nut", json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200 and daemon.registry.get("nut").threshold == 0.9
    from inspectd.daemon.http_common import load_or_create_token

    assert load_or_create_token(path) == token  # stable across restarts


async def test_token_guesses_sent_in_parallel_are_throttled(open_api) -> None:  # noqa: ANN001
    """The console's sign-in slept 0.5 s per wrong token, which does not slow guesses sent in parallel (300 in
    1.96 s), and the admin API's bearer check had no limit at all (300 in 0.10 s)."""
    daemon, session, _ = open_api
    token = Path(daemon.config.http.token_file).read_text().strip()
    wrong = {"Authorization": "Bearer not-the-token"}

    async def guess(i: int) -> int:
        if i % 2:
            async with session.post("/products/nut/reload", headers=wrong) as response:
                return response.status
        async with session.post("/console/api/session", json={"token": f"guess-{i}"}) as response:
            return response.status

    statuses = await asyncio.gather(*(guess(i) for i in range(300)))
    allowed = getattr(daemon, "guess_limiter", None) and daemon.guess_limiter.per_client  # 30 at once
    assert statuses.count(401) <= (allowed or 0) + 2 and statuses.count(429) >= 300 - (allowed or 0) - 2, statuses
    async with session.post("/products/nut/reload", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 429  # the right token too, from this client, until its bucket refills
    limiter = daemon.guess_limiter
    limiter._clients.clear()  # (as if the client's bucket had refilled)
    async with session.post("/products/nut/reload", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
    async with session.get("/products") as response:
        assert response.status == 200  # reads on loopback without a token are not guesses


def test_a_public_bind_without_token_is_refused_by_check_before_any_model_loads(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.delenv("INSPECTD_ADMIN_TOKEN", raising=False)
    config = tmp_path / "public.yaml"
    config.write_text("http: {host: 0.0.0.0}\nmodel: {pretrained: /nonexistent/weights.pt}\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "INSPECTD_ADMIN_TOKEN"}
    for args in (["--check"], []):
        out = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config), *args],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode != 0
        assert "http.token" in out.stderr and "0.0.0.0" in out.stderr, out.stderr[-2000:]
        assert "weights" not in out.stderr.lower().split("http.token")[0][-200:]  # refused before the model


# ----------------------------------------------------------------------------- 4. references under a root
async def test_a_put_cannot_point_references_at_an_unrelated_directory(open_api, tmp_path_factory) -> None:  # noqa: ANN001
    import aiohttp

    daemon, session, tmp = open_api
    token = Path(daemon.config.http.token_file).read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    victim = tmp_path_factory.mktemp("unrelated")
    (victim / "keep.png").write_bytes(thin_png(32, 32))
    body = {"object_name": "hazelnut", "references": str(victim), "shots": 1}
    async with session.put("/products/nut", json=body, headers=auth) as response:
        answer = await response.json()
    assert response.status == 400 and answer["path"] == "references", answer
    assert "references_root" in answer["error"]
    form = aiohttp.FormData()
    form.add_field("file", thin_png(64, 64), filename="x.png", content_type="image/png")
    async with session.post("/products/nut/references?replace=true", data=form, headers=auth) as response:
        assert response.status == 201  # the product's own directory (under the root) is fine
    assert [p.name for p in victim.iterdir()] == ["keep.png"]
    inside = tmp / "refs-2"
    inside.mkdir()
    for name in ("00.png", "01.png"):
        (inside / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
    async with session.put("/products/nut", json={**body, "references": str(inside)}, headers=auth) as response:
        assert response.status == 200  # under registry.references_root


# ----------------------------------------------------------------------------- 7. trimmed input, retention
async def test_frames_trimmed_away_while_pending_are_dead_letters_not_silent_acks(redis_client, key_prefix) -> None:
    from inspectd.streams.redis_source import RedisStreamSource
    from inspectd.streams.schema import DeadLetter

    keys = StreamKeys(key_prefix)
    stream = keys.frames("l1")
    good = thin_png(8, 8)
    for i in range(6):
        await redis_client.xadd(stream, frame_fields("p", "l1", f"f{i}", good))
    first = RedisStreamSource(redis_client, [stream], group="g", consumer="a", block_ms=10, claim_idle_ms=1)
    await first.start()
    assert len(await first.read(6)) == 6  # delivered, never acked (the instance dies)
    await redis_client.xtrim(stream, maxlen=0)  # a producer's MAXLEN trims them away meanwhile
    restarted = RedisStreamSource(redis_client, [stream], group="g", consumer="a", block_ms=10, claim_idle_ms=1)
    await restarted.start()
    items = await restarted.read(3)  # half come back from its own backlog
    assert [type(i) for i in items] == [DeadLetter] * 3
    assert {i.reason for i in items} == {"deleted_before_scoring"} and {i.line for i in items} == {"l1"}
    for item in items:
        await item.ack()
    await asyncio.sleep(0.01)
    other = RedisStreamSource(redis_client, [stream], group="g", consumer="b", block_ms=10, claim_idle_ms=1,
                              claim_interval_s=0)
    await other.start()
    claimed = await other.read(10)  # the rest are found by XAUTOCLAIM, which names the deleted ids
    assert len(claimed) == 3 and {i.reason for i in claimed} == {"deleted_before_scoring"}
    assert restarted.deleted_total + other.deleted_total == 6
    assert (await redis_client.xpending(stream, "g"))["pending"] == 0


async def test_retention_trims_only_what_every_group_is_done_with(redis_client, key_prefix) -> None:
    from inspectd.streams.redis_source import RedisStreamSource

    stream = StreamKeys(key_prefix).frames("l1")
    for i in range(10):
        await redis_client.xadd(stream, frame_fields("p", "l1", f"f{i}", thin_png(8, 8)))
    source = RedisStreamSource(redis_client, [stream], group="g", consumer="a", block_ms=10)
    await source.start()
    items = await source.read(6)
    for item in items[:4]:
        await item.ack()  # 4 acked, 2 pending, 4 never delivered
    assert await source.trim_acked(keep_s=0) == {stream: 4}
    assert await redis_client.xlen(stream) == 6
    assert await source.trim_acked(keep_s=3600) == {}  # recent entries are kept for keep_acked_s anyway
    slow = RedisStreamSource(redis_client, [stream], group="archiver", consumer="x", block_ms=10)
    await slow.start()  # another group that has read nothing yet: nothing may be trimmed for it
    for item in items[4:]:
        await item.ack()
    assert await source.trim_acked(keep_s=0) == {}
    assert await redis_client.xlen(stream) == 6


async def test_idle_consumers_without_pending_entries_are_removed(redis_client, key_prefix) -> None:
    from inspectd.streams.redis_source import RedisStreamSource

    stream = StreamKeys(key_prefix).frames("l1")
    await redis_client.xadd(stream, frame_fields("p", "l1", "f0", thin_png(8, 8)))
    holder = RedisStreamSource(redis_client, [stream], group="g", consumer="holder", block_ms=10)
    await holder.start()
    assert len(await holder.read(1)) == 1  # keeps one pending entry
    for name in ("dead-1", "dead-2"):
        ghost = RedisStreamSource(redis_client, [stream], group="g", consumer=name, block_ms=10)
        await ghost.start()
        await ghost.read(1)  # nothing left: a consumer without pending entries
    me = RedisStreamSource(redis_client, [stream], group="g", consumer="me", block_ms=10)
    await me.start()
    await me.read(1)
    await asyncio.sleep(0.05)
    assert sorted(await me.remove_idle_consumers(idle_ms=10)) == ["dead-1", "dead-2"]
    names = {c["name"].decode() for c in await redis_client.xinfo_consumers(stream, "g")}
    assert names == {"holder", "me"}


# ----------------------------------------------------------------------------- 8. shutdown honours its limit
def test_sigterm_with_a_slow_frame_in_flight_honours_the_timeout_and_says_so(redis_url, key_prefix, tmp_path,
                                                                             tiny_checkpoint) -> None:
    import os
    import signal
    import sys

    import redis
    import yaml

    config = {"model": {"arch": "inspectd-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu"},
              "redis": {"url": redis_url, "prefix": key_prefix, "lines": ["l1"], "block_ms": 100},
              "http": {"enabled": False}, "sinks": {"redis": True}, "shutdown_timeout_s": 2,
              "products": [{"id": "slow", "detector": "test-slow", "shots": 0, "options": {"sleep_s": 8}}]}
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(config))
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import tests.slow_detector; "
            f"from inspectd.cli import main; sys.exit(main(['run', '--config', {str(path)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = redis.Redis.from_url(redis_url)
    stream = StreamKeys(key_prefix).frames("l1")
    try:
        client.xadd(stream, frame_fields("slow", "l1", "f0", png_bytes(HAZELNUT / "good" / "00.png")))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # delivered to the daemon: its slow forward is running
            groups = client.xinfo_groups(stream)
            if groups and groups[0]["pending"] == 1:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
    assert took < 2 + 1.5, f"shutdown took {took:.1f} s against shutdown_timeout_s 2\n{output[-3000:]}"
    assert proc.returncode == 3, output[-3000:]
    assert "still in flight" in output and "redelivered" in output
    assert redis.Redis.from_url(redis_url).xpending(stream, "inspectd")["pending"] == 1  # left for redelivery


# ----------------------------------------------------------------------------- 9. started before Redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start a private server")
async def test_a_daemon_started_before_redis_waits_not_ready_then_serves(tmp_path, tiny_backbone, caplog) -> None:
    import aiohttp
    import redis.asyncio as aioredis

    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    config = one_line_config(url, "late", tmp_path, http={"enabled": True, "port": 0})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    caplog.set_level("WARNING", logger="inspectd.daemon.app")
    starting = asyncio.create_task(daemon.start())
    server = None
    try:
        assert await until(lambda: _true(lambda: getattr(daemon, "http_port", None)), timeout=10)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}") as session:
            await asyncio.sleep(1.0)  # a few failed attempts
            async with session.get("/readyz") as response:
                body = await response.json()
                assert response.status == 503 and body["checks"]["redis"] is False
            async with session.get("/healthz") as response:
                assert response.status == 200  # alive: waiting is not a crash
            assert not starting.done()
            assert any("not reachable" in r.getMessage() for r in caplog.records)
            server = start_redis(port, tmp_path)
            await asyncio.wait_for(starting, 30)
            client = aioredis.from_url(url)
            keys = StreamKeys("late")
            frame = frame_fields("grid", "l1", "f0", png_bytes(HAZELNUT / "good" / "03.png"))
            await client.xadd(keys.frames("l1"), frame)
            assert await until(lambda: _xlen(client, keys.results("l1"), 1))
            async with session.get("/readyz") as response:
                assert response.status == 200
            await client.aclose()
    finally:
        if not starting.done():
            daemon.request_stop()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(starting, 10)
        await daemon.shutdown()
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
