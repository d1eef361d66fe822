"""model.compile: torch.compile'd tower blocks (Inductor on this CPU), batch buckets, the daemon's start-up compile."""

from __future__ import annotations

import asyncio
import io
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch._dynamo.utils import counters

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.detectors import compiled
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, wait_for_results

WINCLIP_LIKE = FeatureRequest(blocks=frozenset({0}), patch_embeddings=True, windows=frozenset({2, 3}))
BIG_CHUNKS = 1 << 17  # one window chunk per window size: fewer shapes to compile in the suite


def wide_png() -> bytes:
    image = Image.open(HAZELNUT / "colour" / "03.png").convert("RGB").resize((320, 180))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def compiled_backbone(tiny_checkpoint: Path) -> ClipBackbone:
    return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                  compile="default", window_chunk_tokens=BIG_CHUNKS))


def test_buckets_pad_at_most_half_a_batch_in_a_log_sized_set() -> None:
    assert [compiled.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 13, 17, 63)] == [1, 2, 4, 4, 8, 8, 12, 16, 24, 64]
    assert compiled.buckets_up_to(20) == [1, 2, 4, 8, 12, 16, 24]
    assert len(compiled.buckets_up_to(256)) == 14
    for rows in range(1, 600):
        assert rows <= compiled.bucket(rows) <= max(2 * rows - 1, 1.5 * rows)
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


def test_check_names_what_a_compile_needs_of_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inspectd.daemon.checks import check_config

    def problems(**model: str) -> list[str]:
        config = parse_config({"demo": True, "model": {"arch": "inspectd-tiny", "pretrained": "random", **model},
                               "redis": {"url": "redis://127.0.0.1:6379/0"}, "products": []})
        return [p for p in check_config(config) if ".compile" in p]

    assert problems(device="cpu", compile="default") == []  # this machine has g++
    assert problems(device="cpu", compile="off") == []
    assert any("reduce-overhead adds CUDA graphs" in p for p in problems(device="cpu", compile="reduce-overhead"))
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without a C++ compiler
    monkeypatch.delenv("CXX", raising=False)
    found = problems(device="cpu", compile="default")
    assert found and found[0].startswith("model.compile:") and "no C++ compiler" in found[0]


def test_compiled_tower_gives_the_eager_features_and_one_graph_serves_every_batch_size(
        compiled_backbone: ClipBackbone, tiny_backbone: ClipBackbone) -> None:
    assert compiled_backbone.fused_blocks is None and compiled_backbone.describe()["kernels"] == "inductor:default"
    assert not compiled_backbone.compiled.cuda_graphs  # a CPU: rows stay dynamic, nothing is padded
    before = compiled_graphs()
    compiled_backbone.warm_up(WINCLIP_LIKE, 240, 64)  # batches of 1 and 2: rows are dynamic from 2 on
    assert compiled_graphs() - before <= 6  # at most 2 per sequence length (full pass, 2x2 and 3x3 windows)
    graphs = compiled_graphs()
    torch.manual_seed(3)
    for rows in (1, 3, 7):
        pixels = torch.randn(rows, 3, 240, 240)
        eager, fast = tiny_backbone.forward(pixels, WINCLIP_LIKE), compiled_backbone.forward(pixels, WINCLIP_LIKE)
        assert len(fast) == rows and fast.windows[3].shape == eager.windows[3].shape
        for got, want in ((fast.image_embeddings, eager.image_embeddings), (fast.blocks[0], eager.blocks[0]),
                          (fast.patch_embeddings, eager.patch_embeddings), (fast.windows[2], eager.windows[2]),
                          (fast.windows[3], eager.windows[3])):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert {(7, 226, 64), (7 * 196, 5, 64), (7 * 169, 10, 64)} <= compiled_backbone.compiled.shapes
    assert compiled_graphs() == graphs  # 3 and 7 rows (and their windows) ran on the warm-up's graphs


def test_the_cuda_graph_path_pads_to_buckets_and_drops_the_padding(tiny_checkpoint: Path,
                                                                    tiny_backbone: ClipBackbone) -> None:
    """What of the CUDA-graph path runs on a CPU: padding to buckets, the warm-up of every bucket, one step per
    pass, copies of the taps (Inductor skips the graphs themselves on a CPU)."""
    backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                      compile="reduce-overhead"))
    assert not backbone.compiled.cuda_graphs  # on a CPU the mode runs no graphs: nothing to pad
    backbone.compiled.cuda_graphs = True  # the path a GPU takes, short of the graphs
    request = FeatureRequest(blocks=frozenset({0}))
    assert backbone.warm_up(request, 240, 3) == 2  # buckets 2 and 4 (1 ran at load)
    assert {s[0] for s in backbone.compiled.shapes} == {1, 2, 4}
    torch.manual_seed(5)
    pixels = torch.randn(3, 3, 240, 240)
    got, want = backbone.forward(pixels, request), tiny_backbone.forward(pixels, request)
    assert len(got) == 3 and got.blocks[0].shape == want.blocks[0].shape
    torch.testing.assert_close(got.blocks[0], want.blocks[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.image_embeddings, want.image_embeddings, atol=2e-5, rtol=1e-4)
    assert {s[0] for s in backbone.compiled.shapes} == {1, 2, 4}  # 3 rows ran as 4


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
    assert (1, 226, 64) in shapes and (2, 226, 64) in shapes
    images = {"good": png_bytes(HAZELNUT / "good" / "05.png"), "colour": png_bytes(HAZELNUT / "colour" / "03.png"),
              "wide": wide_png()}  # 16:9: two tiles, so batches hold more inputs than frames
    sent = 0
    for burst in (1, 3, 2, 5, 4, 1, 7, 3):  # batches of every size up to the limit, some padded
        for _ in range(burst):
            kind = ("good", "colour", "wide")[sent % 3]
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames",
                                    frame_fields("nut" if sent % 2 else "grid", "l1", f"{kind}-{sent}", images[kind]))
            sent += 1
        await asyncio.sleep(0.3)
    results = await wait_for_results(redis_client, key_prefix, sent, timeout=60)
    daemon.request_stop()
    await asyncio.wait_for(task, 30)
    assert len(results) == sent
    assert compiled_graphs() == graphs  # no frame waited for a compile
    assert any(s[1] == 226 and s[0] > 2 for s in compiled_backbone.compiled.shapes - shapes)  # more rows than warmed
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in results:
        scores[(record["product"], record["frame_id"].split("-")[0])].append(float(record["score"]))
    assert len(scores) == 6
    for same_frame in scores.values():  # alone, first or last of a batch, padded or not: one score
        assert max(same_frame) - min(same_frame) < 1e-5


async def test_a_machine_that_cannot_compile_fails_the_start_with_the_reason(
        redis_url, key_prefix, tmp_path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))  # a machine without a C++ compiler
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # (kernels cached by the tests before would do)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nor kernels built on disk before
    config = daemon_config(redis_url, key_prefix, tmp_path,
                           model={"arch": "inspectd-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu",
                                  "compile": "max-autotune-no-cudagraphs"},
                           products=[{"id": "grid", "object_name": "grid", "shots": 0, "mask": "none"}])
    daemon = InspectDaemon(config)
    with pytest.raises(ValueError, match=r"model\.compile=max-autotune-no-cudagraphs: torch\.compile failed.*"
                                         r"C\+\+ compiler.*set model\.compile: off"):
        await asyncio.wait_for(daemon.run(), 120)


def test_towers_that_run_blocks_themselves_keep_eager_blocks(compiled_backbone: ClipBackbone) -> None:
    """AnoPLe's tower calls `_block` for each block: unpadded, outside the forward's lock and CUDA-graph steps, so it
    must not reach the compiled blocks (it did: each of its batch sizes compiled while serving)."""
    shapes, graphs = set(compiled_backbone.compiled.shapes), compiled_graphs()
    x = torch.randn(3, 231, 64)  # 5 prompt tokens: a sequence length the compiled tower never sees
    with torch.inference_mode():
        got = compiled_backbone._block(0, x)
        want = compiled_backbone.visual.transformer.resblocks[0](x)
    assert torch.equal(got, want)
    assert compiled_backbone.compiled.shapes == shapes and compiled_graphs() == graphs
