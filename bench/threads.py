"""CPU attention at the ViT's shapes with MKL as `torch.set_num_threads` leaves it vs as
`inspectd.detectors.cpu_threads.use_threads` leaves it, interleaved in one run (ratios are the thing to read), and
the fused blocks' oneDNN Graph attention (`inspectd.detectors.fused.GraphAttention`) beside SDPA where it is used.

    python -m bench.threads [--rounds 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import best_times
from inspectd.detectors import cpu_threads, fused

# (sequences, tokens): ViT-B-16-plus-240 on 2 frames: 2x2 windows (196 each), 3x3 windows (in 2048-token chunks),
# the full 15x15 + CLS pass, 12 of them (randword's multi-crop views); 14 heads of 64.
SHAPES = ((392, 5), (204, 10), (2, 226), (12, 226))
HEADS, HEAD_DIM = 14, 64


def attention(sequences: int, tokens: int) -> tuple[tuple[torch.Tensor, ...], float]:
    """Strided q/k/v views of one qkv projection, as the fused blocks pass them, and the attention's FLOPs."""
    qkv = torch.randn(sequences * tokens, 3 * HEADS * HEAD_DIM).view(sequences, tokens, 3, HEADS, HEAD_DIM)
    return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0)), 4.0 * sequences * HEADS * tokens * tokens * HEAD_DIM


def sdpa(qkv: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    return lambda: F.scaled_dot_product_attention(*qkv)


def measure(rounds: int) -> list[dict[str, float | str]]:
    """Rows per shape: ms with torch's default MKL state, after torch.set_num_threads, after use_threads."""
    threads = torch.get_num_threads()
    calls = {shape: attention(*shape) for shape in SHAPES}
    untouched = best_times({shape: sdpa(qkv) for shape, (qkv, _) in calls.items()}, rounds, 0.05)
    states = {"torch.set_num_threads": lambda: torch.set_num_threads(threads),
              "use_threads (MKL restored)": cpu_threads.restore_mkl_defaults}
    best: dict[tuple, float] = {}
    for _ in range(rounds):  # interleave the two states; a state applies to every call until the next is set
        for state, enter in states.items():
            enter()
            for key, value in best_times({shape: sdpa(qkv) for shape, (qkv, _) in calls.items()}, 1, 0.05).items():
                best[(state, key)] = min(best.get((state, key), float("inf")), value)
    cpu_threads.restore_mkl_defaults()
    graph = fused.GraphAttention()
    graphed = {shape: qkv for shape, (qkv, _) in calls.items() if graph.wanted(qkv[0])}
    both = best_times({**{("graph", s): (lambda qkv=qkv: graph(*qkv)) for s, qkv in graphed.items()},
                       **{("sdpa", s): sdpa(qkv) for s, qkv in graphed.items()}}, rounds, 0.05)
    rows = []
    for shape, (_, flops) in calls.items():
        row: dict[str, float | str] = {"shape": f"[{shape[0]}, {HEADS}, {shape[1]}, {HEAD_DIM}]",
                                       "default_ms": untouched[shape] * 1e3}
        for state in states:
            row[f"{state}_ms"] = best[(state, shape)] * 1e3
        row["gflops_restored"] = flops / best[("use_threads (MKL restored)", shape)] / 1e9
        if shape in graphed:
            row["graph_ms"] = both[("graph", shape)] * 1e3
            row["graph_vs_sdpa"] = both[("sdpa", shape)] / both[("graph", shape)]
            row["gflops_graph"] = flops / both[("graph", shape)] / 1e9
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; MKL settings reachable: {cpu_threads.restore_mkl_defaults()}")
    print("| q/k/v shape | torch default ms | after torch.set_num_threads ms | after use_threads ms | slowdown undone "
          "| oneDNN Graph ms (GFLOP/s, vs SDPA) |\n| --- | --- | --- | --- | --- | --- |")
    for row in measure(args.rounds):
        slow, fast = row["torch.set_num_threads_ms"], row["use_threads (MKL restored)_ms"]
        graph = (f"{row['graph_ms']:.2f} ({row['gflops_graph']:.0f}, {row['graph_vs_sdpa']:.2f}x)" if "graph_ms" in row
                 else "not used (short)")
        print(f"| {row['shape']} | {row['default_ms']:.2f} | {slow:.2f} | {fast:.2f} | {slow / fast:.2f}x | {graph} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
