"""A new user's first hour: mistakes get one clear line and stay visible (real daemon, real Redis, real files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.daemon.app import InspectDaemon
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes

pytestmark = pytest.mark.redis


async def test_a_broken_product_file_is_failed_in_the_api_counted_and_not_ready(redis_url, key_prefix, tmp_path,
                                                                               tiny_backbone) -> None:
    import aiohttp

    products = tmp_path / "products"
    products.mkdir()
    (products / "grid.yaml").write_text("id: grid\nobject_name: grid\nshots: 0\n")
    (products / "bolt.yaml").write_text("id: bolt\nobject_name: bolt\nshots: 0\ntreshold: {value: 0.5}\n")  # typo
    (products / "nut.yaml").write_text("id: nut\nobject_name: [unclosed\n")  # not YAML
    config = daemon_config(redis_url, key_prefix, tmp_path, http={"enabled": True, "port": 0, "token": "t"},
                           registry={"products_dir": str(products), "watch": False})
    config.products = []
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         headers={"Authorization": "Bearer t"}) as session:
            async with session.get("/products") as response:
                listed = {p["id"]: p for p in (await response.json())["products"]}
            assert listed["grid"]["status"] == "ready"
            assert listed["bolt"]["status"] == "failed" and "treshold" in listed["bolt"]["error"]
            assert listed["nut"]["status"] == "failed" and "nut.yaml" in listed["nut"]["error"]
            async with session.get("/readyz") as response:
                body = await response.json()
                assert response.status == 503 and body["checks"]["products_ready"] is False
            async with session.get("/metrics") as response:
                text = await response.text()
        assert 'inspectd_product_reloads_total{outcome="error",product="bolt"} 1.0' in text
        assert 'inspectd_product_reloads_total{outcome="error",product="nut"} 1.0' in text
    finally:
        await daemon.shutdown()


def test_check_lists_every_problem_with_its_key_path(tmp_path: Path) -> None:
    products = tmp_path / "products"
    products.mkdir()
    (products / "bad.yaml").write_text("id: bad\ndetector: winclip\noptions: {window_size: 2}\n")
    (products / "typo.yaml").write_text("id: typo\ndetector: nosuch\n")
    config = tmp_path / "inspectd.yaml"
    config.write_text(f"""
model: {{device: tpu, pretrained: {tmp_path}/missing-weights.pt}}
redis: {{url: "localhost:6379"}}
registry: {{products_dir: {products}}}
products:
  - {{id: a, detector: randword, options: {{ffn: {tmp_path}/missing-ffn.safetensors}}}}
  - {{id: b, references: {tmp_path}/no-refs, shots: 2, model: other}}
  - {{id: c, options: {{language_weight: half}}, mask: sometimes}}
""")
    out = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "config OK" not in out.stdout
    expected = ["model.device", "model.pretrained", "redis.url", "products[0].options.ffn", "products[1].references",
                "products[1].model", "products[2].options.language_weight", "products[2].mask", "bad.yaml.options",
                "typo.yaml.detector"]
    for key in expected:
        assert f"config error at {key}" in out.stderr, (key, out.stderr)
    assert f"{len(expected)} problem(s)" in out.stderr
    good = tmp_path / "good.yaml"
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "00.png").write_bytes(png_bytes(HAZELNUT / "good" / "00.png"))
    good.write_text(f"model: {{arch: inspectd-tiny, pretrained: random}}\ndemo: true\nsources: {{redis: true}}\n"
                    f"products:\n  - {{id: nut, references: {refs}, shots: 1}}\n")
    ok = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(good), "--check"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "config OK" in ok.stdout, ok.stderr


def test_a_start_up_failure_is_one_clear_message_and_the_traceback_only_with_v(tmp_path: Path) -> None:
    config = tmp_path / "no-weights.yaml"
    config.write_text(f"model: {{arch: inspectd-tiny, pretrained: {tmp_path}/missing.pt}}\n"
                      f"sources: {{redis: false, folders: [{{path: {tmp_path}}}]}}\n"
                      f"sinks: {{redis: false, jsonl: {tmp_path}/out.jsonl}}\nhttp: {{enabled: false}}\n")
    quiet = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config)],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr and "missing.pt" in quiet.stderr and "inspectd weights" in quiet.stderr
    assert "INFO root" not in quiet.stderr  # open_clip's chatter stays out
    assert len(quiet.stderr.strip().splitlines()) <= 10, quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "inspectd.cli", "-v", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert loud.returncode == 1 and "Traceback" in loud.stderr


async def test_create_a_product_with_its_references_in_one_request_and_see_which_are_used(
        redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    import aiohttp

    root = tmp_path / "references"
    root.mkdir()
    config = daemon_config(redis_url, key_prefix, tmp_path, http={"enabled": True, "port": 0, "token": "t"},
                           registry={"watch": False, "references_root": str(root)})
    config.products = []
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    auth = {"Authorization": "Bearer t"}

    def form(*files: tuple[str, bytes], config_text: str | None = None) -> aiohttp.FormData:
        data = aiohttp.FormData()
        if config_text is not None:
            data.add_field("config", config_text, content_type="application/yaml")
        for name, content in files:
            data.add_field("file", content, filename=name, content_type="image/png")
        return data

    good = [png_bytes(HAZELNUT / "good" / f"{i:02d}.png") for i in range(4)]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=auth) as session:
            body = form(("10.png", good[0]), ("11.png", good[1]), config_text="object_name: hazelnut\nshots: 2\n")
            async with session.put("/products/nut", data=body) as response:
                created = await response.json()
            assert response.status == 201, created
            assert created["references"] == ["10.png", "11.png"] and created["version"] == 1
            assert sorted(p.name for p in (root / "nut").iterdir()) == ["10.png", "11.png"]
            async with session.post("/products/nut/references", data=form(("20.png", good[2]))) as response:
                later = await response.json()
            assert response.status == 201 and later["ignored"] == ["20.png"] and "first 2" in later["note"]
            assert later["version"] == 1  # nothing the product uses changed: no new version
            async with session.post("/products/nut/references", data=form(("00.png", good[3]))) as response:
                used = await response.json()
            assert used["ignored"] == [] and used["version"] == 2 and used["references"] == ["00.png", "10.png"]
            async with session.put("/products/bolt", data=form(("a.png", good[0]))) as response:
                assert response.status == 400 and "config" in (await response.json())["error"]
    finally:
        await daemon.shutdown()


async def test_cached_states_are_keyed_by_the_weights_actually_loaded(tmp_path) -> None:
    """Demo (random) weights are seeded, and a state built under other weights is never reused."""
    from inspectd.daemon.config import ProductConfig, RegistryConfig
    from inspectd.daemon.registry import ProductRegistry
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        (refs / f"{i:02d}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{i:02d}.png"))
    product = ProductConfig(id="nut", object_name="hazelnut", references=str(refs), shots=3)
    cache = RegistryConfig(watch=False, state_cache_dir=str(tmp_path / "cache"))

    async def build(seed: int) -> tuple[float, int]:
        backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", device="cpu", demo=True,
                                          seed=seed))
        registry = ProductRegistry(backbone, cache)
        entry = await registry.put(product)
        registry.close()
        return entry.threshold, registry.cache.hits

    first, hits = await build(0)
    again, hits_again = await build(0)  # a restarted demo: same weights, same threshold, served from the cache
    other, hits_other = await build(1)  # other weights: rebuilt, never the stale state
    assert (hits, hits_again, hits_other) == (0, 1, 0)
    assert again == first and other != first


def test_the_redis_demo_walk_through_works_as_the_readme_says(redis_url, key_prefix, tmp_path) -> None:
    import os
    import signal
    import time

    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config" / "demo-redis.yaml").read_text())
    config["redis"].update({"url": redis_url, "prefix": key_prefix})
    config["http"]["port"] = 0
    config["registry"]["state_cache_dir"] = str(tmp_path / "states")
    config["products"][0]["references"] = str((repo / "config" / config["products"][0]["references"]).resolve())
    path = tmp_path / "demo-redis.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "inspectd.cli"]
    daemon = subprocess.Popen([*cli, "run", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        images = sorted(str(p) for p in (HAZELNUT / "colour").glob("0[0-2].png"))
        sent = subprocess.run([*cli, "send", *images, "--product", "hazelnut", "--line", "demo", "--redis",
                               redis_url, "--prefix", key_prefix], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 90
        tail = None
        while time.monotonic() < deadline:
            tail = subprocess.run([*cli, "tail", "--line", "demo", "--redis", redis_url, "--prefix", key_prefix,
                                   "--save", str(tmp_path / "masks")], capture_output=True, text=True, timeout=60)
            if len(tail.stdout.strip().splitlines()) >= 3:
                break
            time.sleep(1.0)
        lines = tail.stdout.strip().splitlines()
        assert len(lines) == 3 and all("hazelnut" in line and "(demo weights)" in line for line in lines), tail
        assert len(list((tmp_path / "masks" / "hazelnut").glob("*.mask.png"))) == 3, tail.stderr
        overlays = [p for p in (tmp_path / "masks" / "hazelnut").glob("*.png") if not p.name.endswith(".mask.png")]
        assert len(overlays) == 3 and "overlay to" in tail.stderr  # frames read back from the input stream
    finally:
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, output[-2000:]
    assert "RANDOM weights" in output and os.path.exists(tmp_path / "states")


def test_daemon_only_check_ignores_products_for_systemds_exec_start_pre(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"products:\n  - {{id: a, references: {tmp_path}/missing, shots: 2}}\n"
                      "model: {arch: inspectd-tiny, pretrained: random}\ndemo: true\n")
    run = [sys.executable, "-m", "inspectd.cli", "run", "--config", str(config), "--check"]
    full = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert full.returncode == 2 and "products[0].references" in full.stderr
    daemon_only = subprocess.run([*run, "--daemon-only"], capture_output=True, text=True, timeout=120)
    assert daemon_only.returncode == 0, daemon_only.stderr
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "inspectd.service").read_text()
    assert "--check --daemon-only" in unit


def test_an_offline_machine_with_a_tag_fails_in_seconds_with_the_way_out(tmp_path: Path) -> None:
    import os
    import time

    config = tmp_path / "tag.yaml"
    config.write_text(f"model: {{arch: ViT-B-16-plus-240, pretrained: laion400m_e31, device: cpu}}\n"
                      f"sources: {{redis: false, folders: [{{path: {tmp_path}}}]}}\n"
                      f"sinks: {{redis: false, jsonl: {tmp_path}/out.jsonl}}\nhttp: {{enabled: false}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path)}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - started
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "HF_HUB_OFFLINE" in out.stderr and "inspectd weights fetch" in out.stderr, out.stderr[-2000:]
    assert took < 30, f"{took:.0f} s"  # no hub retries: HF_HUB_OFFLINE is honoured


def test_the_shipped_template_check_names_what_a_fresh_machine_still_lacks() -> None:
    repo = Path(__file__).resolve().parents[1]
    template = str(repo / "config" / "inspectd.yaml")
    out = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", template, "--check"],
                         capture_output=True, text=True, timeout=120)
    if Path("/var/lib/inspectd/references/bottle").is_dir():
        pytest.skip("this machine has the production reference folder")
    assert out.returncode == 2
    assert "config error at bottle.yaml.references: /var/lib/inspectd/references/bottle is not a folder" in out.stderr
    daemon_only = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config",
                                  str(repo / "config" / "inspectd.yaml"), "--check", "--daemon-only"],
                                 capture_output=True, text=True, timeout=120)
    assert daemon_only.returncode == 0, daemon_only.stderr


def test_run_refuses_a_config_whose_results_would_go_nowhere_and_consumes_nothing(tmp_path: Path) -> None:
    """`--check` rejects a daemon with no sink; `run` used to start anyway (a warning), score the folder's frames,
    move them to done/ and throw their results away. It exits 2 naming the key and leaves the inbox alone."""
    inbox = tmp_path / "inbox" / "nut"
    inbox.mkdir(parents=True)
    (inbox / "00.png").write_bytes(png_bytes(HAZELNUT / "good" / "00.png"))
    config = tmp_path / "nosink.yaml"
    config.write_text(f"model: {{arch: inspectd-tiny, pretrained: random}}\ndemo: true\n"
                      f"sources: {{redis: false, folders: [{{path: {tmp_path / 'inbox'}}}]}}\n"
                      "sinks: {redis: false}\nhttp: {enabled: false}\nproducts: [{id: nut}]\n")
    out = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config), "--idle-exit", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "config error at sinks: no sink is enabled" in out.stderr
    assert (inbox / "00.png").is_file() and not (tmp_path / "inbox" / "done").exists()
