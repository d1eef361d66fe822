"""Backbone speed: images/s of a full forward and of the window pass for ViT-B-16-plus-240 on this machine,
as a ratio to the measured fp32 matmul rate (FLOPs of the pass / measured GFLOP/s). Random weights (timing only).

    python bench/backbone.py [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import best_time, fp32_flop_bound, matmul_gflops, vit_forward_flops, window_pass_flops
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--kernels", default="auto", choices=["auto", "onednn", "torch"])
    args = parser.parse_args()

    backbone = ClipBackbone(ModelSpec(arch=args.arch, pretrained="random", demo=True, device=args.device,
                                      cpu_kernels=args.kernels))
    device = str(backbone.device)
    v = backbone.visual
    grid, patch, width, layers, embed = backbone.grid[0], backbone.patch_size, backbone.width, \
        len(v.transformer.resblocks), backbone.embed_dim
    pixels = torch.randn(args.batch, 3, backbone.image_size, backbone.image_size)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    peak = fp32_flop_bound(width, device, backbone.dtype)
    cls_only_last = backbone.fused_blocks is not None
    print(f"device {device} dtype {backbone.dtype} kernels {backbone.describe()['kernels']}  "
          f"measured GEMM bound: {peak:.1f} GFLOP/s")
    if device == "cpu":
        bf16 = matmul_gflops(torch.bfloat16, n=512)
        fp32_small = matmul_gflops(torch.float32, n=512)
        print(f"bf16 vs fp32 matmul on this CPU (512^2): {bf16:.2f} vs {fp32_small:.1f} GFLOP/s "
              f"(bf16/fp32 = {bf16 / fp32_small:.3g}); 'auto' precision stays fp32 on CPU for exact parity")

    rows = []
    full = best_time(lambda: (backbone.forward(pixels, FeatureRequest()), sync()))
    rows.append(("full forward (CLS)", full, vit_forward_flops(grid, patch, width, layers, embed, cls_only_last)))
    for k in (2, 3):
        wt = best_time(lambda k=k: (backbone.forward(pixels, FeatureRequest(windows=frozenset({k}))), sync())) - full
        rows.append((f"window pass {k}x{k} (token dropping)", wt, window_pass_flops(grid, k, width, layers, embed,
                                                                                      cls_only_last)))
    both = best_time(lambda: (backbone.forward(pixels, FeatureRequest(windows=frozenset({2, 3}),
                                                                     patch_tokens=True)), sync()))
    flops_all = vit_forward_flops(grid, patch, width, layers, embed) + sum(
        window_pass_flops(grid, k, width, layers, embed, cls_only_last) for k in (2, 3))
    rows.append(("full + 2x2 + 3x3 windows", both, flops_all))

    print(f"\n{args.arch} @ {backbone.image_size}px, batch {args.batch}")
    print(f"{'pass':38s} {'images/s':>9s} {'GFLOP/img':>10s} {'GFLOP/s':>9s} {'ratio to matmul':>16s}")
    for name, seconds, flops in rows:
        per_second = args.batch / seconds
        achieved = flops * per_second / 1e9
        print(f"{name:38s} {per_second:9.2f} {flops / 1e9:10.2f} {achieved:9.1f} {achieved / peak:16.2f}")


if __name__ == "__main__":
    main()
