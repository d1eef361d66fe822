"""Model pool: two products on two CLIP models of different input sizes in one daemon, one mixed Redis stream.

Every frame is scored by its own product's model (its score equals scoring it offline with that model),
and each batch runs exactly one image-tower forward per model present in it (counted).
"""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import parse_config
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.tiny import write_tiny_checkpoint
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, png_bytes, wait_for_results

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model: 224-px input (14 x 14 patches), other weights."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-224"), image_size=224, seed=7)


def pool_config(redis_url: str, prefix: str, tmp: Path, big: Path, small: Path) -> object:
    refs = tmp / "refs"
    refs.mkdir(exist_ok=True)
    for name in ("00.png", "01.png"):
        (refs / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
    return parse_config({
        "models": [{"name": "big", "arch": "inspectd-tiny", "pretrained": str(big), "device": "cpu"},
                   {"name": "small", "arch": "inspectd-tiny", "pretrained": str(small), "device": "cpu"}],
        "redis": {"url": redis_url, "prefix": prefix, "lines": ["l1"], "block_ms": 50, "control_stream": None},
        "batcher": {"max_batch_size": 8, "max_delay_ms": 30, "queue_size": 64},
        "http": {"enabled": False},
        "registry": {"watch": False},
        "products": [
            {"id": "nut", "object_name": "hazelnut", "references": str(refs), "shots": 2, "model": "big"},
            {"id": "grid", "object_name": "grid", "shots": 0, "model": "small", "mask": "none"},
            {"id": "nut-small", "object_name": "hazelnut", "references": str(refs), "shots": 2, "model": "small"},
        ],
        "shutdown_timeout_s": 10,
    })


def test_model_names_must_be_unique() -> None:
    from inspectd.daemon.config import ConfigError

    with pytest.raises(ConfigError, match=r"models.*'a'"):
        parse_config({"models": [{"name": "a", "pretrained": "x"}, {"name": "a", "pretrained": "y"}]})


async def test_a_product_naming_an_unloaded_model_is_rejected_by_name(tiny_backbone) -> None:
    from inspectd.daemon.config import ProductConfig, RegistryConfig
    from inspectd.daemon.registry import BuildError, ProductRegistry

    registry = ProductRegistry({"big": tiny_backbone}, RegistryConfig(watch=False))
    with pytest.raises(BuildError, match=r"model 'nope' is not loaded; models: \['big'\]"):
        await registry.put(ProductConfig(id="p", shots=0, model="nope"))
    assert registry.status("p") == "failed"
    entry = await registry.put(ProductConfig(id="q", shots=0))  # no model named: the first
    assert entry.detector.backbone is tiny_backbone and entry.model == "big"
    registry.close()


async def test_two_models_one_mixed_stream(redis_client, redis_url, key_prefix, tmp_path, tiny_checkpoint,
                                           small_checkpoint) -> None:
    daemon = InspectDaemon(pool_config(redis_url, key_prefix, tmp_path, tiny_checkpoint, small_checkpoint))
    await daemon.start()
    try:
        big, small = daemon.backbones["big"], daemon.backbones["small"]
        assert (big.image_size, small.image_size) == (240, 224)
        assert {p: daemon.registry.get(p).detector.backbone for p in ("nut", "grid", "nut-small")} == {
            "nut": big, "grid": small, "nut-small": small}
        batches: list[dict] = []
        score = daemon.engine.score

        async def counting_score(items: list, frames: list | None = None):  # noqa: ANN202
            before = (big.forwards, small.forwards)
            out = await score(items, frames)
            models = {id(item.detector.backbone) for item in items}
            batches.append({"models": models, "big": big.forwards - before[0], "small": small.forwards - before[1],
                            "on_small": {item.state.meta.get("object_name", "") for item in items
                                         if item.detector.backbone is small}})
            return out

        daemon.engine.score = counting_score
        images = {"nut": png_bytes(HAZELNUT / "colour" / "03.png"), "grid": png_bytes(HAZELNUT / "good" / "05.png"),
                  "nut-small": png_bytes(HAZELNUT / "colour" / "03.png")}
        products = ["nut", "grid", "nut-small"]
        n = 24
        pipe = redis_client.pipeline(transaction=False)
        for i in range(n):
            product = products[i % 3]
            pipe.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields(product, "l1", f"f{i:03d}", images[product]))
        await pipe.execute()
        results = await wait_for_results(redis_client, key_prefix, n, timeout=60)
        assert sorted(r["frame_id"] for r in results) == [f"f{i:03d}" for i in range(n)]  # each once, none lost

        # each frame's score is what its own product's model gives it offline
        expected = {}
        for product in products:
            entry = daemon.registry.get(product)
            rgb = np.asarray(Image.open(io.BytesIO(images[product])).convert("RGB"))
            [out] = await asyncio.to_thread(run, [ScoreItem(entry.detector, entry.state, rgb)])
            expected[product] = out.score
        assert len(set(expected.values())) == 3  # the models (and products) really score differently
        for record in results:
            assert float(record["score"]) == pytest.approx(expected[record["product"]], abs=1e-5), record["frame_id"]

        info = [line for line in daemon.metrics.exposition().decode().splitlines()
                if line.startswith("inspectd_model_info{")]  # every model of the pool, not only the first
        assert sorted(re.search(r'model="(\w+)"', line)[1] for line in info) == ["big", "small"], info
        # one forward per model per batch: nut-small and grid share the small model's forward
        assert batches and sum(b["big"] + b["small"] for b in batches) == sum(len(b["models"]) for b in batches)
        for batch in batches:
            assert batch["big"] <= 1 and batch["small"] <= 1
        assert any(batch["small"] == 1 and batch["on_small"] == {"grid", "hazelnut"} for batch in batches)
    finally:
        await daemon.shutdown()
