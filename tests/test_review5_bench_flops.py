"""bench/flops.py counts what a forward executes on every tower path, including open_clip's own blocks, whose
nn.MultiheadAttention runs one fused kernel in inference that torch's FlopCounterMode has no formula for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import vit_forward_flops
from bench.flops import counted_flops


def test_multihead_attention_in_inference_counts_what_its_training_path_counts() -> None:
    attention = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 50, 64)
    slow, by_op = counted_flops(lambda: attention(x, x, x, need_weights=False))  # with grad: linears + SDPA
    assert "aten._native_multi_head_attention" not in by_op
    with torch.inference_mode():  # the fast path: one aten._native_multi_head_attention
        fast, by_op = counted_flops(lambda: attention(x, x, x, need_weights=False))
    assert "aten._native_multi_head_attention" in by_op
    expected = 2 * 100 * 64 * (3 * 64) + 4 * 2 * 50 * 50 * 64 + 2 * 100 * 64 * 64  # qkv, QK^T + AV, out-projection
    assert fast == slow == expected


def test_the_plain_tower_forward_counts_every_block(tiny_checkpoint: Path) -> None:
    """model.cpu_kernels: torch (and every tower the fused blocks do not take): the GFLOP/img of the report's rows
    missed the whole attention of every block (qkv, QK^T, AV, out-projection), a third of the dense work."""
    from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec

    backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                      cpu_kernels="torch"))
    assert backbone.fused_blocks is None
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.inference_mode():
        counted, _ = counted_flops(lambda: backbone.forward(pixels, FeatureRequest()))
    expected = 2 * vit_forward_flops(backbone.grid[0], backbone.patch_size, backbone.width,
                                     len(backbone.visual.transformer.resblocks), backbone.embed_dim)
    assert counted == pytest.approx(expected)


def test_the_time_breakdown_rates_multihead_attention_with_the_gemms_that_run_it() -> None:
    """Its FLOPs run in the mm/bmm/addmm children the profiler times as GEMMs: "other" (element-wise work) must
    stay without FLOPs, and the GEMM kind gets them."""
    from bench.breakdown import breakdown, flops_by_kind

    attention = torch.nn.MultiheadAttention(256, 4, batch_first=True).eval()
    x = torch.randn(4, 200, 256)
    with torch.inference_mode():
        total, per_op = counted_flops(lambda: attention(x, x, x, need_weights=False))
        kinds = flops_by_kind(per_op)
        assert kinds["gemm"] == total and kinds["other"] == 0
        parts = breakdown(lambda: attention(x, x, x, need_weights=False), per_op)
    assert parts["gemm"]["gflops"] is not None and parts["gemm"]["share"] > 0
    assert parts["other"]["gflops"] is None
