"""FLOPs a call executes, counted by torch's FlopCounterMode, plus the kernels it does not know: oneDNN's
prepacked linears (inspectd's fused CPU blocks), the CPU flash-attention kernel of SDPA and the inference fast path
of ``nn.MultiheadAttention`` (open_clip's own blocks where the fused ones do not run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _linear_flops(x_shape: torch.Size, *args: Any, out_shape: torch.Size | None = None, **kwargs: Any) -> int:
    """oneDNN ``_linear_pointwise`` (plain and ``.binary``): 2 x output elements x input features."""
    return 2 * math.prod(out_shape) * int(x_shape[-1])


def _cpu_attention_flops(q_shape: torch.Size, k_shape: torch.Size, *args: Any, out_shape: Any = None,
                         **kwargs: Any) -> int:
    """QK^T and the weighted sum of V: 2 x 2 x batch x heads x queries x keys x head dim (as torch counts SDPA)."""
    return 4 * math.prod(q_shape[:-1]) * int(k_shape[-2]) * int(q_shape[-1])


def _native_mha_flops(q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size, embed_dim: int, *args: Any,
                      out_shape: Any = None, **kwargs: Any) -> int:
    """``aten._native_multi_head_attention``, one kernel for what the slow path runs as linears and SDPA: the q, k and
    v projections, QK^T and the weighted sum over all heads, and the out-projection (query/key: [B,] L, E)."""
    rows_q, rows_k = math.prod(q_shape[:-1]), math.prod(k_shape[:-1])
    projections = 2 * (2 * rows_q + 2 * rows_k) * embed_dim * embed_dim  # q and out (query rows), k and v (key rows)
    return projections + 4 * rows_q * int(k_shape[-2]) * embed_dim


def custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _linear_flops
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _cpu_attention_flops
    native_mha = getattr(torch.ops.aten, "_native_multi_head_attention", None)
    if native_mha is not None:  # nn.MultiheadAttention in eval without grad: FlopCounterMode counted it as 0
        mapping[native_mha] = _native_mha_flops
    return mapping


def counted_flops(fn: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """(total FLOPs, FLOPs per op name) of one call of ``fn``: matmuls, convolutions and attention (the dense
    work; element-wise ops are not counted, as in bench/common.py's analytic counts)."""
    with FlopCounterMode(display=False, custom_mapping=custom_mapping()) as counter:
        fn()
    per_op = {str(op): float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op
