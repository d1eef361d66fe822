"""File watcher (debounced bursts, ignored temp files, product files) and the fleet control stream + CLI."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import tests.toy_trained as toy
from inspectd.cli import main as cli_main
from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.registry import FAILED, READY
from inspectd.daemon.watcher import ignored
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes

pytestmark = pytest.mark.redis


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def local_config(redis_url: str, prefix: str, tmp: Path, **overrides: Any) -> Any:
    """No Redis sources/sinks: only the registry side of the daemon runs."""
    return daemon_config(redis_url, prefix, tmp, sources={"redis": False}, sinks={"redis": False}, **overrides)


def test_ignored_names() -> None:
    for name in (".x.png", "x.png.part", "x.png.tmp", "x.crdownload", "x.png~", ".upload-1.tmp", "X.PART"):
        assert ignored(name), name
    for name in ("x.png", "part.png", "tmp.jpg"):
        assert not ignored(name), name


async def test_watcher_debounces_a_burst_and_ignores_partial_files(redis_url, key_prefix, tmp_path,
                                                                   tiny_backbone) -> None:
    products = tmp_path / "products"
    products.mkdir()
    refs = tmp_path / "refs-nut"
    refs.mkdir()
    for name in ("00", "01"):
        (refs / f"{name}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{name}.png"))
    (products / "nut.yaml").write_text(yaml.safe_dump({"id": "nut", "object_name": "hazelnut",
                                                       "references": "../refs-nut", "shots": 8}))
    config = local_config(redis_url, key_prefix, tmp_path, products=[],
                          registry={"products_dir": str(products), "watch": True, "debounce_s": 0.4})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        registry = daemon.registry
        assert registry.get("nut").version == 1 and daemon.watcher is not None
        builds = registry.builds
        # a burst: four images copied over ~0.3 s (one rewritten), a half-written .part and a hidden file
        for name in ("02", "03", "04", "02", "05"):
            (refs / f"{name}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{name}.png"))
            await asyncio.sleep(0.06)
        (refs / "06.png.part").write_bytes(png_bytes(HAZELNUT / "good" / "06.png")[:500])
        (refs / ".07.png").write_bytes(b"junk")
        await until(lambda: registry.get("nut").version == 2, 15, "one rebuild")
        await asyncio.sleep(1.5)  # no second rebuild trails the first
        assert registry.get("nut").version == 2 and registry.builds == builds + 1
        assert registry.get("nut").state.meta["shots"] == 6  # 00..05; the .part and hidden files were ignored
        # a half-written file alone changes nothing...
        (refs / "06.png.part").write_bytes(png_bytes(HAZELNUT / "good" / "06.png"))
        await asyncio.sleep(1.2)
        assert registry.get("nut").version == 2
        # ...until it is renamed into place
        (refs / "06.png.part").rename(refs / "06.png")
        await until(lambda: registry.get("nut").version == 3, 15, "rebuild after rename")
        assert registry.get("nut").state.meta["shots"] == 7

        # product files: a new one appears (written via a temp name), an edit rebuilds, deletion removes
        refs_bolt = str(refs)
        tmp = products / ".bolt.yaml.tmp"
        tmp.write_text(yaml.safe_dump({"id": "bolt", "object_name": "bolt", "references": refs_bolt, "shots": 2}))
        tmp.rename(products / "bolt.yaml")
        await until(lambda: registry.get("bolt") is not None, 15, "bolt from its product file")
        (products / "bolt.yaml").write_text("id: bolt\nobject_name: bolt\nshots: 2\ntreshold: {}\n")  # bad key
        await asyncio.sleep(1.2)
        assert registry.get("bolt").version == 1 and daemon.watcher.errors >= 1
        (products / "bolt.yaml").write_text(yaml.safe_dump({"id": "bolt", "object_name": "bolt",
                                                            "references": refs_bolt, "shots": 3}))
        await until(lambda: registry.get("bolt").version == 2, 15, "bolt edit")
        (products / "bolt.yaml").unlink()
        await until(lambda: registry.get("bolt") is None, 15, "bolt removed")
        assert registry.get("nut").version == 3
    finally:
        await daemon.shutdown()


async def test_control_stream_reaches_every_instance(redis_client, redis_url, key_prefix, tmp_path,
                                                     tiny_backbone) -> None:
    stream = f"{key_prefix}:control"
    await redis_client.xadd(stream, {"op": "delete", "product": "nut"})  # before start: not replayed
    daemons = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        config = local_config(redis_url, key_prefix, home,
                              redis={"url": redis_url, "prefix": key_prefix, "control_stream": stream},
                              registry={"watch": False})
        daemon = InspectDaemon(config, backbone=tiny_backbone)
        await daemon.start()
        daemons.append(daemon)
    try:
        assert all(d.registry.get("nut").version == 1 for d in daemons)
        assert cli_main(["product", "reload", "nut", "--redis", redis_url, "--stream", stream]) == 0
        await until(lambda: all((e := d.registry.get("nut")) and e.version == 2 for d in daemons), 20, "reload")

        refs = daemons[0].registry.get("nut").config.references
        product_file = tmp_path / "bolt.yaml"
        product_file.write_text(yaml.safe_dump({"id": "bolt", "object_name": "bolt", "references": refs,
                                                "shots": 2}))
        assert cli_main(["product", "put", str(product_file), "--redis", redis_url, "--stream", stream]) == 0
        await until(lambda: all(d.registry.get("bolt") is not None for d in daemons), 20, "put")

        # bad commands are logged and counted, and later ones still apply
        await redis_client.xadd(stream, {"op": "explode", "product": "nut"})
        await redis_client.xadd(stream, {"op": "put", "product": "x", "config": '{"id": "x", "shots": "many"}'})
        await redis_client.xadd(stream, {"op": "reload", "product": "never-heard-of"})
        assert cli_main(["product", "delete", "bolt", "--redis", redis_url, "--stream", stream]) == 0
        await until(lambda: all(d.registry.get("bolt") is None for d in daemons), 20, "delete")
        for daemon in daemons:
            assert daemon.control.errors == 3 and daemon.control.applied == 3
            assert daemon.registry.get("nut").version == 2  # the pre-start delete was not replayed
            assert 'inspectd_errors_total{kind="control"} 3.0' in daemon.metrics.exposition().decode()
    finally:
        for daemon in daemons:
            await daemon.shutdown()


TOKEN = "watch-token"


async def test_the_echo_of_our_own_product_file_never_stops_a_newer_put(redis_url, key_prefix, tmp_path,
                                                                         tiny_backbone) -> None:
    """PUT v1, then PUT v2 (a build that takes a while): the watcher sees v1's product file (written by PUT 1)
    while v2 builds. It used to stop v2 (409 'stopped by a newer update') and leave v1 serving and saved."""
    products = tmp_path / "products"
    products.mkdir()
    refs = tmp_path / "refs"
    config = local_config(redis_url, key_prefix, tmp_path, products=[],
                          http={"enabled": True, "port": 0, "token": TOKEN},
                          registry={"products_dir": str(products), "watch": True, "debounce_s": 0.2,
                                    "references_root": str(tmp_path)})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    echoes: list[tuple[float, dict]] = []  # (when, options) of every force=False put (the watcher's)
    put = daemon.registry.put

    async def recording_put(product_config: Any, force: bool = True) -> Any:
        if not force:
            echoes.append((time.monotonic(), dict(product_config.options)))
        return await put(product_config, force=force)

    daemon.registry.put = recording_put
    common = {"object_name": "hazelnut", "references": str(refs), "shots": 2, "detector": toy.NAME, "mask": "none"}
    v1 = {**common, "options": {"epochs": 1, "steps": 1}, "threshold": {"value": 0.11}}
    v2 = {**common, "options": {"epochs": 4, "steps": 20, "step_sleep_s": 0.05}, "threshold": {"value": 0.22}}  # 4 s
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:

            async def put_v2() -> tuple[int, dict]:
                async with http.put("/products/p", json=v2) as response:
                    return response.status, await response.json()

            async with http.put("/products/p", json=v1) as response:
                assert response.status == 201, await response.text()
            written = (products / "p.yaml").read_text()  # PUT 1's own write
            v2_put = asyncio.create_task(put_v2())
            deadline = time.monotonic() + 15
            while (daemon.registry.progress("p") or {}).get("fraction", 0.0) < 0.05:
                assert time.monotonic() < deadline and not v2_put.done()
                await asyncio.sleep(0.02)
            # the watcher sees PUT 1's file while v2 trains (written again until it did: the watcher needs a moment
            # to start, and this test must see an echo arrive during v2's build to prove anything)
            while not any(options == v1["options"] for _, options in echoes):
                assert not v2_put.done(), "v2 finished before the watcher echoed PUT 1's file"
                (products / "p.yaml").write_text(written)
                await asyncio.sleep(0.3)
            status, answer = await v2_put
        assert status == 200, answer
        assert answer["version"] == 2 and answer["threshold"] == 0.22 and answer["config"]["options"] == v2["options"]
        await asyncio.sleep(1.0)  # the echo of PUT 2's own file: no new version
        await daemon.registry.settled("p", 10)
        entry = daemon.registry.get("p")
        assert entry.version == 2 and entry.threshold == 0.22 and daemon.registry.builds == 2
        saved = yaml.safe_load((products / "p.yaml").read_text())
        assert saved["options"] == v2["options"] and saved["threshold"]["value"] == 0.22
    finally:
        await daemon.shutdown()


async def test_a_product_whose_first_build_failed_builds_once_its_folder_has_images(redis_url, key_prefix, tmp_path,
                                                                                   tiny_backbone) -> None:
    """README: every product's reference directory is watched, a failed product's too (its folder was empty at
    start); the images arriving build it. A folder that does not exist yet is built from once it appears."""
    empty = tmp_path / "bolt-refs"
    empty.mkdir()
    missing = tmp_path / "screw-refs"
    config = local_config(redis_url, key_prefix, tmp_path, registry={"watch": True, "debounce_s": 0.2},
                          products=[{"id": "bolt", "object_name": "bolt", "references": str(empty), "shots": 2},
                                    {"id": "screw", "object_name": "screw", "references": str(missing), "shots": 2}])
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    registry = daemon.registry
    try:
        assert registry.status("bolt") == FAILED and "holds no images" in registry.error("bolt")
        assert registry.status("screw") == FAILED and "does not exist" in registry.error("screw")
        assert empty in daemon.watcher.watched()
        deadline = time.monotonic() + 15
        while daemon.watcher.errors == 0:  # the watcher is on the folder once a change there retries bolt
            (empty / "notes.txt").write_text(str(time.monotonic()))
            await asyncio.sleep(0.3)
            assert registry.status("bolt") == FAILED and time.monotonic() < deadline
        for name in ("00.png", "01.png"):
            (empty / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
        await until(lambda: registry.status("bolt") == READY, 15, "bolt built from the images that arrived")
        assert registry.get("bolt").version == 1 and registry.get("bolt").references == ("00.png", "01.png")
        staging = tmp_path / "staging"  # the folder appears whole (moved into place, images already inside)
        staging.mkdir()
        for name in ("02.png", "03.png"):
            (staging / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
        staging.rename(missing)
        await until(lambda: registry.status("screw") == READY, 15, "screw built from the folder that appeared")
        assert daemon.ready()
    finally:
        await daemon.shutdown()


async def test_changes_made_while_the_products_build_at_start_are_applied(redis_url, key_prefix, tmp_path,
                                                                        tiny_backbone) -> None:
    """The watcher starts once every product is built (minutes with a training detector): a product file edited,
    added or deleted and a reference image added meanwhile used to be missed until the next change."""
    products, refs = tmp_path / "products", tmp_path / "refs"
    products.mkdir()
    refs.mkdir()
    for name in ("00", "01"):
        (refs / f"{name}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{name}.png"))
    slow = {"id": "slow", "object_name": "hazelnut", "detector": toy.NAME, "references": str(refs), "shots": 2,
            "mask": "none", "options": {"epochs": 6, "steps": 10, "step_sleep_s": 0.05}}  # ~3 s of training
    (products / "slow.yaml").write_text(yaml.safe_dump(slow))
    (products / "nut.yaml").write_text(yaml.safe_dump({"id": "nut", "object_name": "hazelnut",
                                                       "references": str(refs), "shots": 8}))
    (products / "gone.yaml").write_text(yaml.safe_dump({"id": "gone", "object_name": "bolt", "shots": 0}))
    config = local_config(redis_url, key_prefix, tmp_path, products=[],
                          registry={"products_dir": str(products), "watch": True, "debounce_s": 0.2})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    starting = asyncio.create_task(daemon.start())
    try:
        await until(lambda: daemon.registry is not None
                    and (daemon.registry.progress("slow") or {}).get("fraction", 0) > 0.05, 20, "slow trains")
        (products / "nut.yaml").write_text(yaml.safe_dump({"id": "nut", "object_name": "walnut",
                                                           "references": str(refs), "shots": 8}))
        (products / "bolt.yaml").write_text(yaml.safe_dump({"id": "bolt", "object_name": "bolt", "shots": 0}))
        (products / "gone.yaml").unlink()
        (refs / "02.png").write_bytes(png_bytes(HAZELNUT / "good" / "02.png"))
        assert daemon.registry.get("slow") is None  # still building: the watcher is not running yet
        await starting
        registry = daemon.registry
        await until(lambda: registry.get("nut").config.object_name == "walnut", 15, "nut.yaml's edit")
        await until(lambda: registry.get("bolt") is not None, 15, "bolt.yaml, added")
        await until(lambda: registry.get("gone") is None, 15, "gone.yaml, deleted")
        await until(lambda: registry.get("nut").state.meta["shots"] == 3, 15, "the new reference image")
    finally:
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await daemon.shutdown()
