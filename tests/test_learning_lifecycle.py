"""How a method learns, end to end, with a test detector that has trainable parts (tests/toy_trained.py).

Offline: `inspectd fit toy-trained` trains its head through the shared loop, saves a learned-part artifact, resumes
an interrupted run from its checkpoint. A daemon (real Redis, tiny random CLIP) loads a product pointing to that
file and scores frames. Per product: the prototype is trained in the background with progress in
GET /products/{id} and the build-progress gauge, stopped by a newer PUT while the old version keeps serving (no
frame lost), resumed from its per-epoch checkpoint. Artifacts of another backbone or detector version are refused
with messages naming both sides.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

import tests.toy_trained as toy
from inspectd.cli import main as cli_main
from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ProductConfig, RegistryConfig, build
from inspectd.daemon.registry import (
    FAILED,
    READY,
    BuildError,
    BuildSuperseded,
    ProductEntry,
    ProductRegistry,
    load_images,
)
from inspectd.detectors.artifacts import LEARNED, ArtifactMismatch, load_artifact, save_artifact
from inspectd.detectors.base import ProductSpec, available_detectors, detector_class
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import (
    DATA,
    HAZELNUT,
    one_line_config,
    png_bytes,
    read_stream,
    wait_for_results,
)

pytestmark = pytest.mark.redis

TOKEN = "learn-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REF_NAMES = ("00.png", "01.png", "02.png")
GAUGE = re.compile(r'^inspectd_product_build_progress\{product="(?P<p>[^"]+)"\} (?P<v>\S+)$', re.M)


# ------------------------------------------------------------------------------------------------ fixtures
def fit_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", toy.NAME, "--dataset", "folder", "--root", str(DATA / "hazelnut_toy"), "--out", str(out),
            "--arch", "inspectd-tiny", "--pretrained", str(checkpoint), "--device", "cpu", "--epochs", "2",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def head_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The head trained by `inspectd fit toy-trained` (in-process) on the tiny checkpoint."""
    out = tmp_path_factory.mktemp("head") / "head.safetensors"
    assert cli_main(fit_args(tiny_checkpoint, out)) == 0
    return out


@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Another tiny CLIP: embed dim 32 instead of 64 (and other weights)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.tiny import tiny_model_config, write_tiny_checkpoint

    out = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-wide"), image_size=240, seed=1)
    config = json.loads((out / "open_clip_config.json").read_text())
    config["model_cfg"] = {**tiny_model_config(240), "embed_dim": 32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = open_clip.CLIP(**config["model_cfg"])
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(config))
    return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(out), device="cpu"))


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    folder = tmp_path / "toy-refs"
    folder.mkdir()
    for name in REF_NAMES:
        (folder / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
    return folder


def product(product_id: str, refs: Path, **options: Any) -> dict[str, Any]:
    return {"id": product_id, "object_name": "hazelnut", "detector": toy.NAME, "options": options,
            "references": str(refs), "shots": len(REF_NAMES), "mask": "none"}


def config_for(redis_url: str, prefix: str, tmp: Path, products: list[dict[str, Any]]) -> Any:
    return one_line_config(redis_url, prefix, tmp, products, TOKEN)


async def start(config: Any, backbone: Any) -> tuple[InspectDaemon, list[ProductEntry]]:
    """A started daemon whose swaps (entries that started serving) are recorded in order."""
    daemon = InspectDaemon(config, backbone=backbone)
    swaps: list[ProductEntry] = []
    hook = daemon._on_registry_change

    def on_change(entry: ProductEntry | None, product_id: str) -> None:
        if entry is not None:
            swaps.append(entry)
        hook(entry, product_id)

    daemon._on_registry_change = on_change
    await daemon.start()
    return daemon, swaps


def gauges(text: str) -> dict[str, float]:
    return {m["p"]: float(m["v"]) for m in GAUGE.finditer(text)}


# ------------------------------------------------------------------------------------------------ a. offline
def test_fit_cli_trains_saves_and_resumes_an_interrupted_run(head_file: Path, tiny_checkpoint: Path,
                                                             tiny_backbone: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert toy.NAME in available_detectors() and detector_class(toy.NAME) is toy.ToyTrained
    artifact = load_artifact(head_file, kind=LEARNED, detector=toy.NAME, detector_version=toy.VERSION,
                             backbone=tiny_backbone.identity)
    assert artifact.backbone == tiny_backbone.identity
    history = artifact.training["history"]
    assert [row["epoch"] for row in history] == [1, 2] and all(row["steps"] == 3 for row in history)
    assert history[1]["loss"] < history[0]["loss"]  # the head learned something
    assert artifact.training["resumed_from_epoch"] == 0
    assert artifact.training["data"]["categories"] == ["hazelnut"] and artifact.training["data"]["defective"] == 12
    assert not torch.equal(artifact.tensors["linear.weight"], torch.eye(64))  # trained away from the identity
    assert not head_file.with_name(head_file.name + ".ckpt").exists()  # checkpoints go once the output exists

    # interrupted (Ctrl-C) before epoch 2: no output, epoch 1's checkpoint stays; the re-run resumes from it
    out = tmp_path / "again.safetensors"
    checkpoint = out.with_name(out.name + ".ckpt") / "loop.safetensors"
    monkeypatch.setattr(toy, "INTERRUPT_AT_EPOCH", 2)
    assert cli_main(fit_args(tiny_checkpoint, out)) == 130  # Ctrl-C: the CLI's exit status, no traceback
    assert not out.exists() and checkpoint.is_file()
    monkeypatch.setattr(toy, "INTERRUPT_AT_EPOCH", None)
    assert cli_main(fit_args(tiny_checkpoint, out)) == 0
    resumed = load_artifact(out)
    assert resumed.training["resumed_from_epoch"] == 1
    assert resumed.training["history"] == history  # epoch 1 restored from the checkpoint, epoch 2 re-run
    for name, tensor in artifact.tensors.items():  # exactly the uninterrupted run's head
        torch.testing.assert_close(resumed.tensors[name], tensor, rtol=0, atol=1e-6)
    assert not checkpoint.parent.exists()


# ------------------------------------------------------------------------------------------------ b. daemon scores
async def test_daemon_loads_the_artifact_and_scores_frames(redis_client, redis_url, key_prefix, tmp_path, refs,
                                                           tiny_backbone, head_file) -> None:
    config = config_for(redis_url, key_prefix, tmp_path, [product("toy", refs, head=str(head_file), epochs=2,
                                                                  steps=2)])
    daemon, swaps = await start(config, tiny_backbone)
    try:
        entry = daemon.registry.get("toy")
        assert entry is not None and entry.version == 1 and [e.version for e in swaps] == [1]
        assert entry.state.meta["head"]["sha256"] == load_artifact(head_file).content_hash
        assert entry.state.meta["steps_run"] == 4 and entry.state.meta["checkpointed"]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http, \
                http.get("/products/toy") as response:
            described = await response.json()
        assert described["status"] == "ready" and described["build"] is None
        assert described["learning"] == {"per_product": "trained", "offline": "ToyTrainer"}
        assert described["calibration"]["references"] == 3 and described["calibration"]["method"] == "quantile"

        images = {"ref": png_bytes(HAZELNUT / "good" / REF_NAMES[0]),
                  "colour": png_bytes(HAZELNUT / "colour" / "03.png"), "good": png_bytes(HAZELNUT / "good" / "05.png")}
        kinds = list(images)
        n = 12
        for i in range(n):
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames",
                                    frame_fields("toy", "l1", f"toy-{i:03d}", images[kinds[i % 3]]))
        results = await wait_for_results(redis_client, key_prefix, n, timeout=20)
        dead = await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")
    finally:
        await daemon.shutdown()
    assert not dead, dead[:2]
    assert sorted(r["frame_id"] for r in results) == [f"toy-{i:03d}" for i in range(n)]
    assert {(r["state_version"], r["detector"]) for r in results} == {("1", toy.NAME)}
    scores = {r["frame_id"]: float(r["score"]) for r in results}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    # a reference frame scores exactly what calibration saw: under the threshold (OK)
    reference = next(r for r in results if r["frame_id"] == "toy-000")
    assert float(reference["score"]) <= described["calibration"]["max_normal"] + 1e-6
    assert reference["verdict"] == "OK"
    by_image = {kind: [s for f, s in scores.items() if kinds[int(f[4:]) % 3] == kind] for kind in kinds}
    assert all(len(v) == 4 and max(v) - min(v) < 1e-5 for v in by_image.values()), by_image  # same image, same score
    means = sorted(sum(v) / 4 for v in by_image.values())
    assert means[1] - means[0] > 1e-4 and means[2] - means[1] > 1e-4, by_image  # different images differ


# ------------------------------------------------------------------------------------------------ c. progress
async def test_background_fit_reports_progress_in_the_api_and_the_gauge(redis_url, key_prefix, tmp_path, refs,
                                                                         tiny_backbone, head_file) -> None:
    daemon, _ = await start(config_for(redis_url, key_prefix, tmp_path, []), tiny_backbone)
    body = product("slow", refs, head=str(head_file), epochs=3, steps=6, step_sleep_s=0.06)
    seen: list[tuple[float, str]] = []  # (fraction, note) from GET
    gauge_values: list[float] = []
    console_fractions: list[float] = []  # the operator console's products view
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http:
            async with http.put("/products/slow?wait=false", json=body) as response:
                accepted = await response.json()
            assert response.status == 202, accepted
            assert accepted["status"] == "building" and accepted["build"] is not None
            deadline = time.monotonic() + 30
            while True:
                async with http.get("/products/slow") as response:
                    state = await response.json()
                async with http.get("/metrics") as response:
                    metric = gauges(await response.text()).get("slow")
                async with http.get("/console/api/overview") as response:  # the console shows it too
                    console = {v["id"]: v for v in (await response.json())["products"]}
                if state["build"] is None:
                    break
                seen.append((state["build"]["fraction"], state["build"]["note"]))
                if console.get("slow", {}).get("build"):
                    console_fractions.append(console["slow"]["build"]["fraction"])
                if metric is not None:
                    gauge_values.append(metric)
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.05)
            async with http.get("/metrics") as response:
                after = gauges(await response.text())
        entry = daemon.registry.get("slow")
    finally:
        await daemon.shutdown()
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions), fractions  # never goes back
    assert len({f for f in fractions if 0.0 < f < 1.0}) >= 5, fractions
    assert any(re.search(r"epoch 2/3 step \d/6", note) for _, note in seen), seen
    assert gauge_values == sorted(gauge_values) and any(0.0 < g < 1.0 for g in gauge_values), gauge_values
    assert "slow" not in after  # the gauge goes when the build ends
    assert any(0.0 < f < 1.0 for f in console_fractions), console_fractions
    assert state["status"] == "ready" and state["version"] == 1 and state["error"] is None
    assert entry.state.meta["steps_run"] == 18 and entry.state.meta["resumed_from_epoch"] == 0


# ------------------------------------------------------------------------------------------------ d. stop by a PUT
async def test_a_newer_put_stops_the_training_build_and_no_frame_is_lost(redis_client, redis_url, key_prefix,
                                                                         tmp_path, refs, tiny_backbone,
                                                                         head_file) -> None:
    v1 = product("toy", refs, head=str(head_file), epochs=1, steps=2)
    v2 = product("toy", refs, head=str(head_file), epochs=4, steps=10, step_sleep_s=0.05)  # ~2 s: stopped
    v3 = product("toy", refs, head=str(head_file), epochs=2, steps=2, lr=0.1)
    daemon, swaps = await start(config_for(redis_url, key_prefix, tmp_path, [v1]), tiny_backbone)
    image = png_bytes(HAZELNUT / "good" / "05.png")
    sent: list[tuple[str, float]] = []  # (frame id, time sent)
    producing = True

    async def produce() -> None:
        i = 0
        while producing:
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields("toy", "l1", f"f{i:04d}", image))
            sent.append((f"f{i:04d}", time.time()))
            i += 1
            await asyncio.sleep(0.04)

    producer = asyncio.create_task(produce())
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http:
            await asyncio.sleep(0.3)

            async def put(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                async with http.put("/products/toy", json=body) as response:
                    return response.status, await response.json()

            v2_put = asyncio.create_task(put(v2))
            deadline = time.monotonic() + 20
            while (daemon.registry.progress("toy") or {}).get("fraction", 0.0) < 0.15:
                assert time.monotonic() < deadline and not v2_put.done()
                await asyncio.sleep(0.02)
            v2_seen_at = time.time()
            await asyncio.sleep(0.4)  # frames keep coming while v2 trains: version 1 scores them
            assert daemon.registry.get("toy").version == 1 and daemon.registry.status("toy") == "ready"
            v3_put_at = time.time()
            status3, body3 = await put(v3)
            status2, body2 = await v2_put
            await asyncio.sleep(0.5)  # frames after the swap
        producing = False
        await producer
        results = await wait_for_results(redis_client, key_prefix, len(sent), timeout=20)
        dead = await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")
        serving = daemon.registry.get("toy")
    finally:
        producing = False
        await producer
        await daemon.shutdown()

    assert status2 == 409 and "stopped by a newer update" in body2["error"], body2
    assert status3 == 200 and body3["version"] == 2, body3  # the stopped build never got a version
    assert body3["config"]["options"] == v3["options"] and serving.config.options == v3["options"]
    assert [(e.version, e.config.options) for e in swaps] == [(1, v1["options"]), (2, v3["options"])]
    assert not dead, dead[:3]
    ids = [r["frame_id"] for r in results]
    assert len(ids) == len(set(ids)) == len(sent), "a frame lost or scored twice"
    assert set(ids) == {f for f, _ in sent}
    by_id = {r["frame_id"]: int(r["state_version"]) for r in results}
    versions = [by_id[f] for f, _ in sent]
    assert set(versions) == {1, 2} and versions == sorted(versions), versions
    # results published while v2 trained (before v3 was even sent) came from version 1
    during = [int(r["state_version"]) for r in results
              if v2_seen_at * 1000 <= int(r["_id"].split("-")[0]) < v3_put_at * 1000]
    assert len(during) >= 4 and set(during) == {1}, during


# ------------------------------------------------------------------------------------------------ e. resume
async def test_a_stopped_fit_resumes_from_its_checkpoint(tmp_path, refs, tiny_backbone, head_file) -> None:
    ended: list[tuple[str, str | None]] = []  # (product, status) when a build ended
    registry: ProductRegistry | None = None

    def on_progress(product_id: str, fraction: float | None) -> None:
        if fraction is None:
            ended.append((product_id, registry.status(product_id)))

    registry = ProductRegistry(tiny_backbone, RegistryConfig(state_cache_dir=str(tmp_path / "cache"), watch=False),
                               on_progress=on_progress)
    options_a = {"head": str(head_file), "epochs": 4, "steps": 5, "step_sleep_s": 0.05}
    config_a = build(ProductConfig, product("res", refs, **options_a), "")
    config_b = build(ProductConfig, product("res", refs, **{**options_a, "lr": 0.02}), "")
    checkpoints = tmp_path / "cache"

    async def until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + 20
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {registry.progress('res')}"
            await asyncio.sleep(0.01)

    try:
        first = asyncio.create_task(registry.put(config_a))
        await until(lambda: "epoch 2/4" in (registry.progress("res") or {}).get("note", ""), "epoch 2 of A")
        assert len(list(checkpoints.glob("res-*.ckpt/loop.safetensors"))) == 1  # A's epoch 1 is saved
        a_started = registry.progress("res")["started_at"]
        second = asyncio.create_task(registry.put(config_b))  # stops A
        with pytest.raises(BuildSuperseded):
            await first

        def b_trains() -> bool:
            running = registry.progress("res")
            return running is not None and running["started_at"] != a_started and "epoch" in running["note"]

        await until(b_trains, "B training")
        third = asyncio.create_task(registry.put(config_a))  # stops B; A again: same fingerprint, same checkpoint
        with pytest.raises(BuildSuperseded):
            await second
        entry = await third
    finally:
        registry.close()
    meta = entry.state.meta
    assert entry.version == 1 and entry.config.options == options_a
    resumed = meta["resumed_from_epoch"]
    assert 1 <= resumed <= 3, meta  # A was stopped in epoch 2 (3 or 4 on a slow machine)
    assert meta["steps_run"] == (4 - resumed) * 5 < 4 * 5, meta  # only the epochs after the checkpoint ran
    assert [row["epoch"] for row in meta["history"]] == [1, 2, 3, 4]
    assert not (checkpoints / f"res-{entry.fingerprint}.ckpt").exists()  # the finished state replaced them
    assert (checkpoints / f"res-{entry.fingerprint}.safetensors").is_file()
    # the resumed prototype is the one an uninterrupted fit gives
    detector = toy.ToyTrained(tiny_backbone, {**options_a, "step_sleep_s": 0.0})
    images = load_images(sorted(refs.iterdir()))
    straight = detector.fit(ProductSpec("res", "hazelnut"), images)
    assert straight.meta["steps_run"] == 20 and straight.meta["history"] == meta["history"]
    torch.testing.assert_close(entry.state.tensors["prototype"], straight.tensors["prototype"], rtol=0, atol=1e-6)
    assert [p for p, _ in ended] == ["res"] * 3


# Registry bugs found by these tests (each failed before the fix): the registry tracked only the *running*
# build per product, never one queued behind it, and removal waited for a running training.
SLOW = {"epochs": 4, "steps": 10, "step_sleep_s": 0.05}  # a 2 s per-product training


async def training(registry: ProductRegistry, product_id: str) -> None:
    deadline = time.monotonic() + 20
    while (registry.progress(product_id) or {}).get("fraction", 0.0) < 0.1:
        assert time.monotonic() < deadline, registry.progress(product_id)
        await asyncio.sleep(0.01)


async def test_a_superseded_first_build_is_never_reported_failed(tmp_path, refs, tiny_backbone) -> None:
    statuses: list[str | None] = []
    registry: ProductRegistry | None = None

    def on_progress(product_id: str, fraction: float | None) -> None:
        if fraction is None:  # the superseded build has ended; the newer one waits for the lock
            statuses.append(registry.status(product_id))

    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False), on_progress=on_progress)
    try:
        first = asyncio.create_task(registry.put(build(ProductConfig, product("new", refs, **SLOW), "")))
        await training(registry, "new")
        second = asyncio.create_task(registry.put(build(ProductConfig, product("new", refs, epochs=1, steps=1), "")))
        with pytest.raises(BuildSuperseded):
            await first
        await second
    finally:
        registry.close()
    # frames arriving in between would be dead-lettered `product_failed` instead of waiting for the newer build
    assert statuses[0] != FAILED, statuses


async def test_a_queued_build_is_stopped_by_an_even_newer_put(tmp_path, refs, tiny_backbone) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    try:
        running = asyncio.create_task(registry.put(build(ProductConfig, product("q", refs, **SLOW), "")))
        await training(registry, "q")
        queued = asyncio.create_task(registry.put(build(ProductConfig, product("q", refs, **SLOW, lr=0.02), "")))
        newest = asyncio.create_task(registry.put(build(ProductConfig, product("q", refs, epochs=1, steps=1), "")))
        with pytest.raises(BuildSuperseded):
            await running
        outcome = await asyncio.gather(queued, return_exceptions=True)
        entry = await newest
    finally:
        registry.close()
    assert entry.version == 1 and registry.builds == 1, (entry.version, registry.builds)  # only the newest swapped
    assert isinstance(outcome[0], BuildSuperseded), outcome


async def test_remove_stops_a_running_training_build(tmp_path, refs, tiny_backbone) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    try:
        put = asyncio.create_task(registry.put(build(ProductConfig, product("gone", refs, **SLOW), "")))
        await training(registry, "gone")
        started = time.monotonic()
        assert await registry.remove("gone")
        took = time.monotonic() - started
        outcome = await asyncio.gather(put, return_exceptions=True)
    finally:
        registry.close()
    assert took < 1.0, f"remove waited {took:.2f} s for a build it should have stopped"
    assert isinstance(outcome[0], BuildSuperseded) and registry.builds == 0, (outcome, registry.builds)


async def test_closing_the_registry_stops_a_running_training_build(tmp_path, refs, tiny_backbone) -> None:
    """Shutdown: a training fit ends at its next step; it used to run to its end, holding the process's exit (the
    interpreter joins the build thread) until systemd killed it."""
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    put = asyncio.create_task(registry.put(build(ProductConfig, product("long", refs, epochs=40, steps=10,
                                                                        step_sleep_s=0.05), "")))
    await training(registry, "long")
    started = time.monotonic()
    registry.close()
    outcome = await asyncio.gather(put, return_exceptions=True)
    threads = list(registry._executor._threads)
    await asyncio.to_thread(lambda: [t.join(5) for t in threads])
    took = time.monotonic() - started
    assert isinstance(outcome[0], BuildSuperseded), outcome
    assert took < 2.0 and not any(t.is_alive() for t in threads), f"the build thread ran on for {took:.1f} s"


# Registry bugs found in review (each test failed before the fix): the file watcher's echo of the daemon's own writes
# (a force=False put or reload) stopped the newer build it echoed, and a product whose first build failed was
# forgotten (never rebuilt).
async def test_echoes_of_our_own_writes_stop_no_build(tmp_path, refs, tiny_backbone) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    v1 = build(ProductConfig, product("echo", refs, epochs=1, steps=1), "")
    v2 = build(ProductConfig, product("echo", refs, **SLOW), "")
    try:
        first = await registry.put(v1)
        second = asyncio.create_task(registry.put(v2))
        await training(registry, "echo")
        # the watcher reading v1's product file (saved once v1 served) while v2 trains: a stale echo, answered at once
        started = time.monotonic()
        assert await registry.put(copy.deepcopy(v1), force=False) is first
        assert time.monotonic() - started < 0.5
        assert registry.wanted("echo") == v2 and registry.progress("echo") is not None  # v2 still trains
        # the echo of v2 itself, and a folder reload that reads the same files: both wait for v2's build
        echo = asyncio.create_task(registry.put(copy.deepcopy(v2), force=False))
        reload = asyncio.create_task(registry.reload("echo", force=False))
        entry = await second
        assert await echo is entry and await reload is entry
    finally:
        registry.close()
    assert entry.version == 2 and entry.config == v2 and registry.builds == 2


async def test_a_folder_reload_with_changed_files_restarts_the_build(tmp_path, refs, tiny_backbone) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    config = build(ProductConfig, product("fold", refs, **SLOW), "")
    try:
        first = asyncio.create_task(registry.put(config))
        await training(registry, "fold")
        (refs / REF_NAMES[0]).write_bytes(png_bytes(HAZELNUT / "good" / "05.png"))  # replaced while it trains
        second = asyncio.create_task(registry.reload("fold", force=False))  # a real change: the old read is stale
        with pytest.raises(BuildSuperseded):
            await first
        entry = await second
    finally:
        registry.close()
    assert entry.version == 1 and registry.builds == 1
    assert entry.references == REF_NAMES


async def test_a_product_whose_first_build_failed_is_kept_and_retried(tmp_path, tiny_backbone) -> None:
    later = tmp_path / "later"
    later.mkdir()  # the operator has not copied the images yet
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    config = build(ProductConfig, product("late", later, epochs=1, steps=1), "")
    try:
        with pytest.raises(BuildError, match="holds no images"):
            await registry.put(config)
        assert registry.status("late") == FAILED and registry.get("late") is None
        assert registry.wanted("late") == config and config in registry.known_configs()  # its folder is watched
        for name in REF_NAMES:
            (later / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
        entry = await registry.reload("late", force=False)  # what the watcher does when the images arrive
    finally:
        registry.close()
    assert entry.version == 1 and registry.status("late") == READY and registry.error("late") is None


# ------------------------------------------------------------------------------------------------ f. mismatches
def test_mismatched_backbone_or_detector_version_names_both(head_file, tiny_backbone, wide_backbone,
                                                            tmp_path) -> None:
    with pytest.raises(ArtifactMismatch) as err:
        toy.ToyTrained(wide_backbone, {"head": str(head_file)}).load_head()
    message = str(err.value)
    ours, theirs = tiny_backbone.identity, wide_backbone.identity
    assert ours["weights"] != theirs["weights"] and ours["embed_dim"] == 64 and theirs["embed_dim"] == 32
    assert f"inspectd-tiny/{ours['weights']} (embed dim 64)" in message, message
    assert f"inspectd-tiny/{theirs['weights']} (embed dim 32)" in message, message
    assert "embed_dim" in message and toy.REFIT_HINT in message

    future = version_mismatched(head_file, tmp_path)
    with pytest.raises(ArtifactMismatch) as err:
        toy.ToyTrained(tiny_backbone, {"head": str(future)}).load_head()
    assert "'toy-trained' version 7" in str(err.value) and "is version 1" in str(err.value), str(err.value)
    toy.ToyTrained(tiny_backbone, {"head": str(head_file)}).load_head()  # the right pair loads


def version_mismatched(head_file: Path, tmp_path: Path) -> Path:
    artifact = load_artifact(head_file)
    artifact.detector_version = 7
    out = tmp_path / "head-v7.safetensors"
    save_artifact(artifact, out)
    return out


async def test_daemon_rejects_mismatched_artifacts_and_keeps_serving(redis_client, redis_url, key_prefix, tmp_path,
                                                                     refs, tiny_backbone, wide_backbone,
                                                                     head_file) -> None:
    good = product("toy", refs, head=str(head_file), epochs=1, steps=2)
    config = config_for(redis_url, key_prefix, tmp_path, [good])
    daemon, swaps = await start(config, {"default": tiny_backbone, "wide": wide_backbone})
    future = version_mismatched(head_file, tmp_path)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http:
            async with http.put("/products/toy", json=product("toy", refs, head=str(future))) as response:
                answer = await response.json()
            assert response.status == 422, answer
            assert "version 7" in answer["error"] and "is version 1" in answer["error"], answer
            async with http.get("/products/toy") as response:
                state = await response.json()
            assert state["status"] == "ready" and state["version"] == 1 and "version 7" in state["error"]
            assert state["config"]["options"] == good["options"]

            wide = {**product("widey", refs, head=str(head_file)), "model": "wide"}
            async with http.put("/products/widey", json=wide) as response:
                answer = await response.json()
            assert response.status == 422, answer
            assert "(embed dim 64)" in answer["error"] and "(embed dim 32)" in answer["error"], answer
            async with http.get("/products/widey") as response:
                state = await response.json()
            assert state["status"] == "failed" and "embed dim 32" in state["error"]

            for i in range(5):  # the daemon keeps running and scoring with version 1
                await redis_client.xadd(f"{key_prefix}:{{l1}}:frames",
                                        frame_fields("toy", "l1", f"m{i}", png_bytes(HAZELNUT / "good" / "05.png")))
            results = await wait_for_results(redis_client, key_prefix, 5, timeout=20)
            async with http.get("/healthz") as response:
                assert response.status == 200
    finally:
        await daemon.shutdown()
    assert sorted(r["frame_id"] for r in results) == [f"m{i}" for i in range(5)]
    assert {r["state_version"] for r in results} == {"1"}
    assert [e.version for e in swaps] == [1]
