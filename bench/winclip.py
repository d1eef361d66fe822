"""WinCLIP speed at the paper's settings (ViT-B-16-plus-240, 240 px, 2x2 + 3x3 windows): images/s zero-shot
and 4-shot through the same pipeline the daemon uses, and the ratio to this machine's fp32 FLOP bound
measured in the same run. Random weights (timing only).

    python -m bench.winclip [--batch 8] [--device auto] [--kernels auto torch]

The bound is the best rate of any GEMM kernel torch has here (MKL and prepacked oneDNN on CPU). It is
measured before the first setting and after every setting; each setting is rated against the higher of the
bounds measured just before and just after it ("ratio"), since what this VM's neighbours leave drifts over
a long run, and also against the highest bound of the whole run ("ratio to run max", the stricter number).
FLOPs are those the pass executes (bench/common.py).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import best_time, fp32_flop_bound, vit_forward_flops, window_pass_flops
from inspectd.detectors.backbone import ClipBackbone, ModelSpec
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run

Row = tuple[str, str, float, float, float]  # kernels, setting, images/s, FLOPs per image, local bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--size", type=int, default=512, help="frame side before the resize to the model size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "onednn", "torch"],
                        help="model.cpu_kernels settings to time, one after the other")
    args = parser.parse_args()
    results = []
    bounds: list[float] = []  # measured before the first setting and after every setting
    for kernels in args.kernels:
        backbone = ClipBackbone(ModelSpec(arch=args.arch, pretrained="random", demo=True, device=args.device,
                                          cpu_kernels=kernels))
        if not bounds:
            bounds.append(measure_bound(backbone))
        results += time_settings(args, backbone, kernels, bounds)
    peak = max(bounds)
    print(f"{args.arch} @ {backbone.image_size}px ({args.size}px frames resized) on {backbone.device} "
          f"({backbone.dtype}), batch {args.batch}; GEMM bound measured {len(bounds)} times in this run: "
          f"{min(bounds):.1f}-{peak:.1f} GFLOP/s")
    print(f"{'kernels':11s} {'setting':10s} {'images/s':>9s} {'ms/image':>9s} {'GFLOP/img':>10s} {'GFLOP/s':>8s} "
          f"{'bound here':>11s} {'ratio':>6s} {'ratio to run max':>17s}")
    for kernels, name, per_second, image_flops, local_bound in results:
        achieved = image_flops * per_second / 1e9
        print(f"{kernels:11s} {name:10s} {per_second:9.2f} {1000 / per_second:9.1f} {image_flops / 1e9:10.1f} "
              f"{achieved:8.1f} {local_bound:11.1f} {achieved / local_bound:6.2f} {achieved / peak:17.2f}")


def measure_bound(backbone: ClipBackbone) -> float:
    return fp32_flop_bound(backbone.width, str(backbone.device), backbone.dtype)


def time_settings(args: argparse.Namespace, backbone: ClipBackbone, kernels: str, bounds: list[float]) -> list[Row]:
    """(kernels, setting, images/s, FLOPs per image, GEMM bound around it) for zero-shot and each k-shot
    setting. The bound is measured after each setting (appended to ``bounds``); a setting's bound is the
    higher of the one before and the one after it, so slow drift in what this VM's neighbours leave is
    matched in time."""
    device = str(backbone.device)
    label = f"{kernels}:{backbone.describe()['kernels']}" if kernels == "auto" else kernels
    detector = create_detector("winclip", backbone)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.batch)]
    references = [rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8) for _ in range(max(args.shots))]
    states = [("0-shot", detector.fit(ProductSpec("p", "object"), []), 0)]
    states += [(f"{k}-shot", detector.fit(ProductSpec("p", "object"), references[:k]), k) for k in args.shots]
    tiles = [backbone.preprocessor(f) for f in frames]

    def batch(state) -> None:  # noqa: ANN001
        run([ScoreItem(detector, state, tiles=t, layout=layout, map_size=(args.size, args.size))
                       for t, layout in tiles])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    grid, width, layers, embed = backbone.grid[0], backbone.width, len(backbone.visual.transformer.resblocks), \
        backbone.embed_dim
    cls_only_last = backbone.fused_blocks is not None
    windows_flops = sum(window_pass_flops(grid, k, width, layers, embed, cls_only_last) for k in (2, 3))

    def forward_flops(shots: int) -> float:
        """Zero-shot reads no patch tokens: with the fused blocks its full pass runs the last block for CLS only."""
        return vit_forward_flops(grid, backbone.patch_size, width, layers, embed,
                                 cls_only_last and shots == 0) + windows_flops
    windows = {k: (grid - k + 1) ** 2 for k in (2, 3)}
    patches = grid * grid

    def association_flops(shots: int) -> float:
        """Per image: every query position against every stored reference position (GEMMs)."""
        return sum(2 * embed * u * shots * u for u in windows.values()) + 2 * width * patches * shots * patches

    rows = []
    for name, state, shots in states:
        before = bounds[-1]
        seconds = best_time(lambda state=state: batch(state), repeats=3)
        bounds.append(after := measure_bound(backbone))
        rows.append((label, name, args.batch / seconds, forward_flops(shots) + association_flops(shots),
                     max(before, after)))
    return rows


if __name__ == "__main__":
    main()
