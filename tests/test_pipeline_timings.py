"""The batch's stage timings (`pipeline.run`): forward and score split the batch's time, on the host's clock on the
CPU and on the stream's (CUDA events) on a GPU, where a forward returns before its kernels have run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ForwardTime, ScoreItem, run

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def _items(backbone: ClipBackbone, n: int) -> list[ScoreItem]:
    detector = create_detector("winclip", backbone, {})
    state = detector.fit(ProductSpec("nut", "hazelnut"), [])
    image = np.asarray(Image.open(HAZELNUT / "good" / "00.png").convert("RGB"))
    return [ScoreItem(detector, state, image) for _ in range(n)]


def test_forward_and_score_split_the_batchs_time_on_the_cpu(tiny_backbone: ClipBackbone) -> None:
    items = _items(tiny_backbone, 4)
    run(items)  # warm, and every item prepared: run() then times only the forward and the scoring
    timings: dict[str, float] = {}
    began = time.perf_counter()
    run(items, timings)
    wall = time.perf_counter() - began
    assert timings["forward"] > 0 and timings["score"] >= 0
    assert timings["forward"] + timings["score"] == pytest.approx(wall, rel=0.1, abs=0.005)


def test_forward_time_on_the_cpu_is_the_forwards_wall_time() -> None:
    clock = ForwardTime()
    assert clock.run(torch.device("cpu"), lambda: time.sleep(0.05) or 7) == 7
    assert 0.05 <= clock.seconds() < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/device runs it where one is)")
def test_forward_time_on_a_gpu_counts_the_kernels_not_their_launch() -> None:
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    clock = ForwardTime()
    began = time.perf_counter()
    clock.run(a.device, lambda: [a @ a for _ in range(20)])
    launched = time.perf_counter() - began
    torch.cuda.synchronize()
    wall = time.perf_counter() - began
    assert clock.seconds() > 0.8 * wall > launched
