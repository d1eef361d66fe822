"""The fused tower's blocks over a batch's every token row at once vs in groups of whole sequences of at most
`FusedBlocks.chunk_rows` rows, timed in turn in one run (ViT-B-16-plus-240, seeded random weights, fp32 CPU).

    python -m bench.chunks [--arch ViT-B-16-plus-240] [--rounds 3] [--tiles 4 16 36]

A batch of N tiles of the plain pass is N sequences of 1 + grid^2 tokens; 36 tiles is what 4 frames of 512 px make.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import best_times, load_model, transformer_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiles", type=int, nargs="+", default=[4, 16, 36])
    parser.add_argument("--blocks", type=int, default=4, help="blocks timed (each runs the same shapes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_model(args.arch, Path(tmp))
    fused = backbone.fused_blocks
    if fused is None:
        raise SystemExit("no fused blocks on this machine (oneDNN unavailable or a GPU)")
    width, length = backbone.width, backbone.grid[0] * backbone.grid[1] + 1
    grouped = fused.chunk_rows
    print(f"{args.arch}, {length} tokens a tile, groups of at most {grouped} rows, {args.blocks} blocks; GFLOP/s")
    print(f"{'tiles':>5s} {'rows':>6s} {'all rows':>9s} {'grouped':>8s} {'ratio':>6s}")
    for tiles in args.tiles:
        x = torch.randn(tiles, length, width)

        def blocks(chunk_rows: int, x: torch.Tensor = x) -> None:
            fused.chunk_rows = chunk_rows
            with torch.inference_mode():
                y = x
                for i in range(args.blocks):
                    y = fused.block(i, y)

        best = best_times({"all": lambda: blocks(1 << 30), "grouped": lambda: blocks(grouped)}, rounds=args.rounds)
        flops = transformer_flops(length, tiles, width, args.blocks)
        rate = {k: flops / s / 1e9 for k, s in best.items()}
        print(f"{tiles:5d} {tiles * length:6d} {rate['all']:9.0f} {rate['grouped']:8.0f} "
              f"{rate['grouped'] / rate['all']:6.2f}", flush=True)
    fused.chunk_rows = grouped


if __name__ == "__main__":
    main()
