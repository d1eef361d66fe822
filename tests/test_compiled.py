"""model.compile: torch.compile'd tower blocks (Inductor on this CPU), batch buckets, the daemon's start-up compile."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.detectors import compiled
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, wait_for_results

WINCLIP_LIKE = FeatureRequest(blocks=frozenset({0}), patch_embeddings=True, windows=frozenset({2, 3}))
BIG_CHUNKS = 1 << 17  # one window chunk per window size: fewer shapes to compile in the suite


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def compiled_backbone(tiny_checkpoint: Path) -> ClipBackbone:
    return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                  compile="default", window_chunk_tokens=BIG_CHUNKS))


def test_buckets_pad_small_batches_to_powers_of_two_then_multiples_of_8() -> None:
    assert [compiled.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 63)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 64]
    assert compiled.buckets_up_to(20) == [1, 2, 4, 8, 16, 24]
    with pytest.raises(ValueError, match="at least one row"):
        compiled.bucket(0)
    x = torch.ones(3, 2)
    padded = compiled.pad_rows(x, 4)
    assert padded.shape == (4, 2) and padded[:3].eq(1).all() and padded[3].eq(0).all()
    assert compiled.pad_rows(x, 3) is x


def test_compile_is_validated_at_load_naming_the_key() -> None:
    base = {"demo": True, "model": {"arch": "inspectd-tiny", "pretrained": "random"}, "products": []}
    with pytest.raises(ConfigError, match=r"model\.compile.*'fast'"):
        parse_config({**base, "model": {**base["model"], "compile": "fast"}})
    with pytest.raises(ConfigError, match=r"model\.compile.*cpu_kernels"):
        parse_config({**base, "model": {**base["model"], "compile": "default", "cpu_kernels": "onednn"}})
    assert parse_config({**base, "model": {**base["model"], "compile": "reduce-overhead"}}).model.compile == \
        "reduce-overhead"
    for written, meant in (("off", "off"), ("on", "default"), ("'off'", "off"), ("max-autotune", "max-autotune")):
        data = yaml.safe_load(f"demo: true\nmodel: {{arch: inspectd-tiny, pretrained: random, compile: {written}}}")
        assert parse_config({**data, "products": []}).model.compile == meant  # YAML's bare off is false
    with pytest.raises(ValueError, match="compile must be one of"):
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", demo=True, compile="fastest"))


def test_compiled_tower_gives_the_eager_features_and_compiles_each_bucket_once(
        compiled_backbone: ClipBackbone, tiny_backbone: ClipBackbone) -> None:
    assert compiled_backbone.fused_blocks is None and compiled_backbone.describe()["kernels"] == "inductor:default"
    compiled_backbone.warm_up(WINCLIP_LIKE, 240, 4)
    grid_tokens = 1 + 15 * 15
    for rows in (1, 2, 4):  # full pass, 2x2 windows (196 per input), 3x3 windows (169 per input)
        assert {(rows, grid_tokens, 64), (rows * 196, 5, 64), (rows * 169, 10, 64)} <= compiled_backbone.compiled.shapes
    graphs, shapes = compiled_graphs(), set(compiled_backbone.compiled.shapes)
    assert graphs >= 9  # the two blocks share each shape's graph
    torch.manual_seed(3)
    for rows in (1, 3, 4):  # 3 rows run padded to 4
        pixels = torch.randn(rows, 3, 240, 240)
        eager, fast = tiny_backbone.forward(pixels, WINCLIP_LIKE), compiled_backbone.forward(pixels, WINCLIP_LIKE)
        assert len(fast) == rows and fast.windows[3].shape == eager.windows[3].shape
        for got, want in ((fast.image_embeddings, eager.image_embeddings), (fast.blocks[0], eager.blocks[0]),
                          (fast.patch_embeddings, eager.patch_embeddings), (fast.windows[2], eager.windows[2]),
                          (fast.windows[3], eager.windows[3])):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert compiled_graphs() == graphs and compiled_backbone.compiled.shapes == shapes  # no compile after warm-up


def test_a_padded_row_never_changes_the_real_rows(compiled_backbone: ClipBackbone) -> None:
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 240, 240)
    alone = compiled_backbone.forward(pixels[:1], WINCLIP_LIKE)
    together = compiled_backbone.forward(pixels, WINCLIP_LIKE)  # padded to 4 with a zero row
    torch.testing.assert_close(together.windows[2][:1], alone.windows[2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(together.image_embeddings[:1], alone.image_embeddings, atol=2e-5, rtol=1e-4)


async def test_daemon_compiles_every_batch_size_before_it_serves(redis_client, redis_url, key_prefix, tmp_path,
                                                                 compiled_backbone: ClipBackbone) -> None:
    config = daemon_config(redis_url, key_prefix, tmp_path, batcher={"max_batch_size": 4, "max_delay_ms": 10,
                                                                      "queue_size": 64},
                           model={"device": "cpu", "compile": "default", "window_chunk_tokens": BIG_CHUNKS})
    daemon = InspectDaemon(config, backbone=compiled_backbone)
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + 240  # a cold compile of every bucket takes ~30-60 s on 2 cores
    while not daemon.started and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert daemon.started
    graphs, shapes = compiled_graphs(), set(compiled_backbone.compiled.shapes)
    assert {(n, 226, 64) for n in (1, 2, 4)} <= shapes
    images = {"good": png_bytes(HAZELNUT / "good" / "05.png"), "colour": png_bytes(HAZELNUT / "colour" / "03.png")}
    sent = 0
    for burst in (1, 3, 2, 5, 4, 1, 7, 3):  # batches of every size up to the limit, some padded
        for _ in range(burst):
            kind = "good" if sent % 3 else "colour"
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames",
                                    frame_fields("nut" if sent % 2 else "grid", "l1", f"{kind}-{sent}", images[kind]))
            sent += 1
        await asyncio.sleep(0.3)
    results = await wait_for_results(redis_client, key_prefix, sent, timeout=60)
    daemon.request_stop()
    await asyncio.wait_for(task, 30)
    assert len(results) == sent
    assert compiled_graphs() == graphs and compiled_backbone.compiled.shapes == shapes  # no frame waited for one
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in results:
        scores[(record["product"], record["frame_id"].split("-")[0])].append(float(record["score"]))
    assert len(scores) == 4
    for same_frame in scores.values():  # alone, first or last of a batch, padded or not: one score
        assert max(same_frame) - min(same_frame) < 1e-5


async def test_a_machine_that_cannot_compile_fails_the_start_with_the_reason(
        redis_url, key_prefix, tmp_path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))  # a machine without a C++ compiler
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # (kernels cached by the tests before would do)
    config = daemon_config(redis_url, key_prefix, tmp_path,
                           model={"arch": "inspectd-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu",
                                  "compile": "max-autotune-no-cudagraphs"},
                           products=[{"id": "grid", "object_name": "grid", "shots": 0, "mask": "none"}])
    daemon = InspectDaemon(config)
    with pytest.raises(ValueError, match=r"model\.compile=max-autotune-no-cudagraphs: torch\.compile failed.*"
                                         r"C\+\+ compiler.*set model\.compile: off"):
        await asyncio.wait_for(daemon.run(), 120)
