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
    """Measured dense matmul rate (GFLOP/s) of this machine for ``dtype``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def step() -> None:
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    seconds = best_time(step, repeats=5)
    return 2 * n**3 / seconds / 1e9


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
