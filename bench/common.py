"""Shared benchmark helpers: measured fp32 matmul rate and analytic FLOPs of CLIP ViT passes."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu") -> float:
    """Measured dense square matmul rate (GFLOP/s) of this machine for ``dtype``."""
    return gemm_gflops(n, n, n, dtype, device)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)

    def step() -> None:
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    seconds = best_time(step, repeats=5)
    return 2 * m * k * n / seconds / 1e9


def fp32_flop_bound(width: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The machine's fp32 FLOP bound: the best measured rate over square GEMMs and the ViT's own GEMM
    shapes (tokens x width x 3*width, tokens x width x 4*width), in GFLOP/s."""
    shapes = [(2048, 2048, 2048), (4096, width, 3 * width), (4096, width, 4 * width), (4096, 4 * width, width)]
    return max(gemm_gflops(m, k, n, dtype, device) for m, k, n in shapes)


def transformer_flops(tokens: int, sequences: int, width: int, layers: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``sequences`` sequences of ``tokens`` tokens through a ViT block stack."""
    dense = (8 + 4 * mlp_ratio) * width * width  # qkv (6), out proj (2), mlp (2 * 2 * ratio), per token, x FLOP=2
    attention = 4 * tokens * width  # scores + weighted sum, per token
    return sequences * tokens * layers * (dense + attention)


def vit_forward_flops(grid: int, patch: int, width: int, layers: int, embed: int) -> float:
    tokens = grid * grid + 1
    patch_embed = 2 * grid * grid * (3 * patch * patch) * width
    return patch_embed + transformer_flops(tokens, 1, width, layers) + 2 * width * embed


def window_pass_flops(grid: int, k: int, width: int, layers: int, embed: int) -> float:
    windows = (grid - k + 1) ** 2
    return transformer_flops(1 + k * k, windows, width, layers) + windows * 2 * width * embed
