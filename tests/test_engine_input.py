"""The engine pre-processes a frame for its product's own detector, and again (from the encoded bytes) when the
product was not serving yet or a hot swap changed the detector's input: the result is as if scored directly."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.daemon.engine import MAX_AUTO_DECODE_THREADS, ScoringEngine, auto_decode_threads, usable_cores
from inspectd.detectors import cpu_threads
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.preprocess import InputSpec
from inspectd.detectors.winclip import WinClip
from inspectd.streams.schema import Frame

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


class SquareWinClip(WinClip):
    name = "test-engine-square"

    def input_spec(self) -> InputSpec:
        return InputSpec(288, "square")


def frame_of(path: Path, size: tuple[int, int]) -> tuple[Frame, np.ndarray]:
    image = Image.open(path).convert("RGB").resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Frame("nut", "l1", "f1", 0.0, payload=buffer.getvalue()), np.asarray(image)


async def test_prepared_for_the_products_detector_and_redone_after_an_input_change(tiny_backbone) -> None:
    engine = ScoringEngine([tiny_backbone.device], decode_threads=0)
    tiled, square = create_detector("winclip", tiny_backbone), SquareWinClip(tiny_backbone)
    state = tiled.fit(ProductSpec("nut", "hazelnut"), [])
    try:
        frame, rgb = frame_of(HAZELNUT / "colour" / "01.png", (400, 260))
        [prepared] = await engine.prepare([frame], lambda product: tiled if product == "nut" else None)
        assert prepared.prepared_by == tiled.preprocessor and prepared.prepared_by.spec == InputSpec(240, "tile")
        assert prepared.tiles.shape[0] == 2
        assert frame.payload is not None  # kept until scored: a swap may need another input

        # the serving detector changed (hot swap) between prepare and score: re-prepared for the new one
        item = ScoreItem(square, state, tiles=prepared.tiles, layout=prepared.layout, prepared_by=prepared.prepared_by)
        [out], _ = await engine.score([item], [frame])
        assert item.tiles.shape == (1, 3, 288, 288) and frame.payload is None
        [direct] = run([ScoreItem(square, state, rgb)])
        assert out.score == pytest.approx(direct.score, abs=1e-6)
        np.testing.assert_allclose(out.map, direct.map, atol=1e-6)

        # a frame whose product was not serving at prepare time is decoded only, then prepared at score time
        frame2, rgb2 = frame_of(HAZELNUT / "good" / "03.png", (240, 240))
        [unknown] = await engine.prepare([frame2], lambda product: None)
        assert unknown.tiles is None and unknown.size == (240, 240)
        [out2], _ = await engine.score([ScoreItem(tiled, state)], [frame2])
        [direct2] = run([ScoreItem(tiled, state, rgb2)])
        assert out2.score == pytest.approx(direct2.score, abs=1e-6)
        assert out2.map.shape == (240, 240)
    finally:
        engine.close()


def test_auto_decode_threads_scale_with_the_cores_beside_a_gpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert auto_decode_threads([cpu], cores=16) == 0  # a CPU engine decodes on its own thread, between forwards
    assert auto_decode_threads([gpu], cores=16) == 14  # every core but the event loop's and the engine thread's
    assert auto_decode_threads([cpu, gpu], cores=8) == 6  # any GPU model: the pool feeds it
    assert auto_decode_threads([gpu], cores=2) == 2
    assert auto_decode_threads([gpu], cores=96) == MAX_AUTO_DECODE_THREADS


def test_usable_cores_are_capped_by_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("100000 100000\n")  # a container limited to 1 CPU
    assert usable_cores(v2) == 1
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 threads may run
    assert usable_cores(v2) == min(affinity, 2)
    (v2 / "cpu.max").write_text("max 100000\n")  # no quota: the affinity
    assert usable_cores(v2) == affinity
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path / "v1") == affinity
    assert usable_cores(tmp_path / "none") == affinity  # nothing readable: the affinity


async def test_decode_pool_workers_run_torch_on_one_thread_and_prepare_the_same_tiles(tiny_backbone) -> None:
    """The pool's workers each run their torch ops alone (left at torch's count, every worker opened its own
    OpenMP team: bench/decode_pool.py); the engine thread keeps torch's count, and the tiles are bit-identical to
    those prepared on the engine thread."""
    if not cpu_threads._openmp_runtimes():
        pytest.skip("torch's OpenMP runtime is not reachable here (workers keep torch's count)")
    before = torch.get_num_threads()
    cpu_threads.use_threads(max(2, before))  # (a no-op where torch already has 2 or more)
    expected = torch.get_num_threads()
    pooled = ScoringEngine([torch.device("cuda")], decode_threads=2)  # a GPU engine's pool (no GPU is touched)
    inline = ScoringEngine([tiny_backbone.device], decode_threads=0)
    detector = create_detector("winclip", tiny_backbone)
    try:
        loop = asyncio.get_running_loop()
        counts = await asyncio.gather(*(loop.run_in_executor(pooled._decode, torch.get_num_threads)
                                        for _ in range(8)))
        assert counts == [1] * 8
        assert await loop.run_in_executor(pooled._engine, torch.get_num_threads) == expected
        frames = [frame_of(HAZELNUT / "colour" / "01.png", size)[0] for size in ((512, 512), (900, 380))]
        a = await pooled.prepare(frames, lambda _product: detector)
        b = await inline.prepare(frames, lambda _product: detector)
        for x, y in zip(a, b, strict=True):
            assert x.tiles is not None and torch.equal(x.tiles, y.tiles)
    finally:
        pooled.close()
        inline.close()
        cpu_threads.use_threads(before)


async def test_a_swap_to_a_model_with_another_resize_prepares_in_flight_frames_again(tiny_backbone,
                                                                                      tiny_checkpoint) -> None:
    """Same input size and mode, other `model.resize`: frames prepared for the old model are made again for the new
    one, so a hot swap scores them exactly as the new model scores a frame that arrives after it."""
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec

    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu", resize="fast"))
    engine = ScoringEngine([tiny_backbone.device], decode_threads=0)
    old, new = create_detector("winclip", tiny_backbone), create_detector("winclip", fast)
    state = new.fit(ProductSpec("nut", "hazelnut"), [])
    try:
        frame, rgb = frame_of(HAZELNUT / "colour" / "01.png", (1500, 1100))
        [prepared] = await engine.prepare([frame], lambda _product: old)
        item = ScoreItem(new, state, tiles=prepared.tiles, layout=prepared.layout, prepared_by=prepared.prepared_by)
        [out], _ = await engine.score([item], [frame])
        [direct] = run([ScoreItem(new, state, rgb)])
        [stale] = run([ScoreItem(new, state, tiles=prepared.tiles, layout=prepared.layout)])
        assert stale.score != direct.score  # the two resizes differ on this frame: the check below can fail
        assert out.score == pytest.approx(direct.score, abs=1e-6)
        assert item.prepared_by == new.preprocessor and item.prepared_by != old.preprocessor
    finally:
        engine.close()
