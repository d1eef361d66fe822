"""The fused blocks' linears on oneDNN (prepacked, GELU and residual add in the epilogue) vs the BLAS torch links
(MKL; activation and add as passes after it), timed in turn in one run: each of a block's four calls at a detector's
row counts, then the tower's full pass and WinCLIP's window passes (ViT-B-16-plus-240, seeded random weights, fp32
CPU). What `fused.auto_gemm` picks on this CPU is printed beside them.

    python -m bench.gemm [--arch ViT-B-16-plus-240] [--rounds 5] [--rows 452 2048]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import best_times, load_model
from inspectd.detectors import fused
from inspectd.detectors.backbone import FeatureRequest


def block_calls(block: fused._Block, rows: int, width: int) -> dict[str, tuple[float, object]]:
    """(FLOPs, call) of each of ``block``'s linears as `_Block` runs them, on ``rows`` random token rows."""
    x, hidden = torch.randn(rows, width), torch.randn(rows, 4 * width)
    return {"qkv": (2 * rows * width * 3 * width, lambda: block.qkv(x)),
            "out + residual": (2 * rows * width * width, lambda: block.out.add_to(x, x)),
            "MLP up + GELU": (2 * rows * width * 4 * width, lambda: block.fc(x, block.post, block.algorithm)),
            "MLP down + residual": (2 * rows * 4 * width * width, lambda: block.proj.add_to(hidden, x))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[452, 2048], help="452: a full pass of 2 frames")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_model(args.arch, Path(tmp))
    if backbone.fused_blocks is None:
        raise SystemExit("no fused blocks on this machine (oneDNN unavailable or a GPU)")
    tower, width, rows_hint = backbone.visual.transformer, backbone.width, backbone.fused_blocks.chunk_rows
    kernels = {gemm: fused.FusedBlocks(tower, rows_hint=rows_hint, gemm=gemm) for gemm in ("onednn", "blas")}
    print(f"{args.arch} on {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"auto picks {fused.auto_gemm(torch.float32)}; best of {args.rounds} rounds timed in turn")
    print(f"\n{'call':22s} {'rows':>5s} {'onednn GFLOP/s':>15s} {'blas GFLOP/s':>13s} {'blas / onednn':>14s}")
    with torch.inference_mode():
        for rows in args.rows:
            calls = {gemm: block_calls(blocks.blocks[0], rows, width) for gemm, blocks in kernels.items()}
            for name, (flops, _) in calls["onednn"].items():
                best = best_times({gemm: calls[gemm][name][1] for gemm in kernels}, rounds=args.rounds,
                                  min_round_s=0.2)
                print(f"{name:22s} {rows:5d} {flops / best['onednn'] / 1e9:15.0f} {flops / best['blas'] / 1e9:13.0f} "
                      f"{best['onednn'] / best['blas']:14.2f}", flush=True)
        print(f"\n{'pass':36s} {'onednn ms':>10s} {'blas ms':>8s} {'blas / onednn':>14s}")
        pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
        request = FeatureRequest(patch_embeddings=True, blocks=frozenset({len(tower.resblocks) // 2}))
        passes = {"full pass, 2 frames": lambda: backbone.forward(pixels, request)}
        for k in (2, 3):
            windows = 2 * (backbone.grid[0] - k + 1) * (backbone.grid[1] - k + 1)
            sequences = torch.randn(windows, 1 + k * k, width)
            passes[f"{k}x{k} windows of 2 frames ({windows})"] = \
                lambda s=sequences: backbone.fused_blocks.cls_output(s)

        def on(gemm: str, tower_pass: Callable[[], object]) -> None:
            backbone.fused_blocks = kernels[gemm]
            tower_pass()

        for name, tower_pass in passes.items():
            best = best_times({gemm: lambda g=gemm, p=tower_pass: on(g, p) for gemm in kernels},
                              rounds=max(2, args.rounds // 2))
            print(f"{name:36s} {best['onednn'] * 1e3:10.0f} {best['blas'] * 1e3:8.0f} "
                  f"{best['onednn'] / best['blas']:14.2f}", flush=True)

if __name__ == "__main__":
    main()
