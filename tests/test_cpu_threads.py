"""Setting torch's CPU threads leaves MKL's dynamic threading on (the state torch starts in), so kernels that call
MKL inside torch's parallel loops (CPU attention over many short windows) do not nest MKL threading per task."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from inspectd.detectors import cpu_threads
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec

pytestmark = pytest.mark.skipif(cpu_threads._mkl() is None, reason="this torch build has no reachable MKL")


def mkl_dynamic() -> int:
    """MKL's dynamic-threading flag, read through MKL's service layer (what MKL itself consults)."""
    getter = getattr(cpu_threads._mkl(), "mkl_serv_get_dynamic", None)
    if getter is None:
        pytest.skip("MKL's dynamic flag cannot be read in this build")
    getter.restype = ctypes.c_int
    return int(getter())


@pytest.fixture
def threads_restored() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    cpu_threads.use_threads(before)
    cpu_threads.restore_mkl_defaults()


def test_torch_set_num_threads_turns_mkl_dynamic_off_and_use_threads_does_not(threads_restored: int) -> None:
    cpu_threads.restore_mkl_defaults()
    torch.set_num_threads(threads_restored)  # what inspectd called before: same count, MKL changed anyway
    assert mkl_dynamic() == 0
    cpu_threads.restore_mkl_defaults()
    assert mkl_dynamic() == 1
    other = 1 if threads_restored != 1 else 2
    assert cpu_threads.use_threads(other) is True
    assert torch.get_num_threads() == other
    assert mkl_dynamic() == 1


def test_use_threads_changes_nothing_for_zero_or_the_current_count(threads_restored: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert cpu_threads.use_threads(0) is False
    assert cpu_threads.use_threads(threads_restored) is False
    assert calls == []


@pytest.mark.parametrize("threads", [0, 1])
def test_loading_a_backbone_leaves_mkl_dynamic_on(tiny_checkpoint: Path, threads_restored: int, threads: int) -> None:
    cpu_threads.restore_mkl_defaults()
    ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu", threads=threads))
    assert torch.get_num_threads() == (threads or threads_restored)
    assert mkl_dynamic() == 1


def test_a_forward_on_a_new_thread_after_threads_were_set_runs_with_mkl_dynamic_on(
        tiny_checkpoint: Path, threads_restored: int) -> None:
    """torch applies a set thread count again on each new thread's first parallel op, and that turns MKL's dynamic
    threading off for the whole process: the daemon builds its model on one thread and scores on another."""
    backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                      threads=1 if threads_restored != 1 else 2))
    pixels = torch.randn(1, 3, 240, 240)
    seen: list[int] = []

    def forward_and_read() -> None:
        backbone.forward(pixels, FeatureRequest())
        seen.append(mkl_dynamic())

    for _ in range(2):  # two fresh threads, each with its own first parallel op
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(forward_and_read).result()
    assert seen == [1, 1]
