"""Where a detector's time goes: one batch under torch.profiler, its wall time split by kind of kernel (GEMM,
attention, convolution, the rest) with each kind's achieved GFLOP/s from the FLOPs counted on the same batch, so
the report shows which kernels hold a detector below the physical peak."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from torch.profiler import ProfilerActivity, profile

KINDS = ("gemm", "attention", "conv", "other")
# nn.MultiheadAttention's inference kernel: its counted FLOPs (projections, QK^T, AV) run in its mm/bmm/addmm
# children, which the profiler names as GEMMs
_GEMMS = ("_linear_pointwise", "mm", "addmm", "bmm", "baddbmm", "_native_multi_head_attention")


def kind_of(op: str) -> str:
    """The kind of an op named as torch.profiler ("aten::mm") or FlopCounterMode ("aten.mm.default") names it."""
    name = op.replace("::", ".").lower()
    if "scaled_dot_product" in name or "flash_attention" in name or "llgapartition" in name:  # oneDNN Graph
        return "attention"
    if "convolution" in name:
        return "conv"
    parts = name.split(".")
    if any(part in _GEMMS for part in parts[1:3]):
        return "gemm"
    return "other"


def flops_by_kind(per_op: Mapping[str, float]) -> dict[str, float]:
    """FlopCounterMode's FLOPs per op summed per kind (element-wise work is not counted: "other" stays 0)."""
    out = dict.fromkeys(KINDS, 0.0)
    for op, flops in per_op.items():
        out[kind_of(op)] += flops
    return out


def self_seconds_by_kind(events: Any) -> dict[str, float]:
    """Self CPU seconds per kind over the profiler's averaged events (ops run on the calling thread: wall time)."""
    out = dict.fromkeys(KINDS, 0.0)
    for event in events:
        out[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    return out


def breakdown(call: Callable[[], object], flops: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """{kind: {"share": fraction of the batch's wall time, "gflops": that kind's FLOPs / its time}}; "other" is
    the wall time no GEMM, attention or convolution kernel took (element-wise ops, copies, Python)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        call()
        wall = time.perf_counter() - started
    seconds = self_seconds_by_kind(prof.key_averages())
    seconds["other"] = max(0.0, wall - sum(seconds[k] for k in KINDS if k != "other"))
    by_kind = flops_by_kind(flops)
    return {kind: {"share": seconds[kind] / wall,
                   "gflops": by_kind[kind] / seconds[kind] / 1e9 if by_kind[kind] and seconds[kind] else None}
            for kind in KINDS}
