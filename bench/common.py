"""Shared benchmark helpers: measured fp32 matmul rate and analytic FLOPs of CLIP ViT passes."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch

from inspectd.detectors.backbone import ClipBackbone, ModelSpec


def run_for(fn: Callable[[], object], frames_per_call: int, seconds: float, warmup: int = 1,
            min_calls: int = 1) -> dict[str, Any]:
    """``fn`` again and again for ``seconds`` (and at least ``min_calls`` times: a loaded machine still gives as
    many samples) after ``warmup`` calls: frames/s, and per frame the kernel time (ms) and minor page faults this
    process took meanwhile (``call_faults``: each call's)."""
    for _ in range(warmup):
        fn()
    before, started, frames = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    call_faults, faults = [], before.ru_minflt
    while time.perf_counter() - started < seconds or len(call_faults) < min_calls:
        fn()
        frames += frames_per_call
        now = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        call_faults.append(now - faults)
        faults = now
    elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return {"frames_per_s": frames / elapsed, "kernel_ms_per_frame": 1000 * (after.ru_stime - before.ru_stime) / frames,
            "faults_per_frame": (after.ru_minflt - before.ru_minflt) / frames, "call_faults": call_faults}


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times(fns: Mapping[Hashable, Callable[[], object]], rounds: int = 3, min_round_s: float = 0.0,
               warmup: int = 1) -> dict[Hashable, float]:
    """Best seconds of each of ``fns``, timed in turn: ``rounds`` rounds, each running every function once (more
    times, to at least ``min_round_s``, for a cheap one). On a machine other processes share, interleaving spreads
    each function's samples over the whole measurement, so one busy spell cannot spoil all of one function's."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {key: float("inf") for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            spent = 0.0
            while True:
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
                best[key] = min(best[key], seconds)
                spent += seconds
                if spent >= min_round_s:
                    break
    return best


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu") -> float:
    """Measured dense square matmul rate (GFLOP/s) of this machine for ``dtype``."""
    return gemm_gflops(n, n, n, dtype, device)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                kernel: str = "blas") -> float:
    """Best-of-5 rate of one [m, k] x [k, n] product: torch.mm (MKL/cuBLAS) or, on CPU, oneDNN's linear
    with its weight prepacked (the kernel inspectd's fused blocks use)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    if kernel == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m)

        def step() -> None:
            torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    else:
        def step() -> None:
            torch.mm(a, b)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

    seconds = best_time(step, repeats=5)
    return 2 * m * k * n / seconds / 1e9


def gemm_kernels(device: str) -> list[str]:
    from inspectd.detectors import fused

    return ["blas", "onednn"] if device == "cpu" and fused.available() else ["blas"]


def fp32_flop_bound(width: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The machine's dense FLOP bound for ``dtype``: the best measured rate over every GEMM kernel torch
    offers here (MKL and prepacked oneDNN on CPU), square 2048^3 and the ViT's own GEMM shapes (qkv,
    MLP up, MLP down at 2048 and 4096 token rows), in GFLOP/s."""
    shapes = [(2048, 2048, 2048)]
    shapes += [(m, k, n) for m in (2048, 4096) for k, n in ((width, 3 * width), (width, 4 * width), (4 * width, width))]
    return max(gemm_gflops(m, k, n, dtype, device, kernel) for m, k, n in shapes for kernel in gemm_kernels(device))


def transformer_flops(tokens: int, sequences: int, width: int, layers: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``sequences`` sequences of ``tokens`` tokens through a ViT block stack."""
    dense = (8 + 4 * mlp_ratio) * width * width  # qkv (6), out proj (2), mlp (2 * 2 * ratio), per token, x FLOP=2
    attention = 4 * tokens * width  # scores + weighted sum, per token
    return sequences * tokens * layers * (dense + attention)


def vit_forward_flops(grid: int, patch: int, width: int, layers: int, embed: int, cls_only_last: bool = False
                      ) -> float:
    """One image's forward; ``cls_only_last``: the last block for the CLS token only (the fused blocks do that when
    only the image embedding is read), as `window_pass_flops` counts it."""
    tokens = grid * grid + 1
    patch_embed = 2 * grid * grid * (3 * patch * patch) * width
    if not cls_only_last:
        return patch_embed + transformer_flops(tokens, 1, width, layers) + 2 * width * embed
    return patch_embed + transformer_flops(tokens, 1, width, layers - 1) + _cls_last_block(tokens, 1, width) \
        + 2 * width * embed


def _cls_last_block(tokens: int, sequences: int, width: int) -> float:
    """A block run for token 0 of each sequence: keys and values of every token, the query, out-projection and
    MLP of one, its attention over all."""
    return sequences * (tokens * 4 * width * width + (2 + 2 + 16) * width * width + 4 * tokens * width)


def window_pass_flops(grid: int, k: int, width: int, layers: int, embed: int, cls_only_last: bool = False) -> float:
    """FLOPs the window pass executes. With ``cls_only_last`` (the fused blocks) the last block computes
    keys/values for all tokens but query, attention output, out-projection and MLP for the CLS token
    only, so those skipped FLOPs are not counted."""
    windows = (grid - k + 1) ** 2
    tokens = 1 + k * k
    head = windows * 2 * width * embed
    if not cls_only_last:
        return transformer_flops(tokens, windows, width, layers) + head
    return transformer_flops(tokens, windows, width, layers - 1) + _cls_last_block(tokens, windows, width) + head


def load_model(name: str, tmp: Path, device: str = "cpu", precision: str = "auto", compile: str = "off"
               ) -> ClipBackbone:
    """The benchmark's CLIP: "tiny" (a seeded tiny checkpoint written into ``tmp``) or an open_clip arch with
    random (demo) weights: timing only, the scores mean nothing. ``compile``: model.compile's mode."""
    from inspectd.detectors.tiny import register_tiny_arch, write_tiny_checkpoint

    register_tiny_arch()
    if name == "tiny":
        return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(write_tiny_checkpoint(tmp / "tiny")),
                                      device=device, precision=precision, compile=compile))
    return ClipBackbone(ModelSpec(arch=name, pretrained="random", device=device, precision=precision, demo=True,
                                  compile=compile))


def scoring_rows(backbone: ClipBackbone, items: list, shots: int, what: str) -> list[dict]:
    """images/s of ``pipeline.run`` over prepared ``items`` and, for reference, of the plain tower's forward."""
    from inspectd.detectors.backbone import FeatureRequest
    from inspectd.detectors.pipeline import prepare, run

    prepare(items)
    batch = len(items)
    seconds = best_time(lambda: run(items), repeats=3)
    pixels = torch.cat([item.tiles for item in items])
    plain = best_time(lambda: backbone.forward(pixels, FeatureRequest()), repeats=3)
    return [{"what": f"score {shots}-shot, batch {batch} ({what})", "value": batch / seconds, "unit": "images/s"},
            {"what": f"plain tower forward only, batch {batch} (reference)", "value": batch / plain,
             "unit": "images/s"}]
