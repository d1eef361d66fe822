"""The tiny model scoring on one thread with its OpenMP team alone vs beside one idle team of another thread (what
the daemon's model-loading and build threads left before `cpu_threads.release_team`), timed in turn in one run.

    python -m bench.openmp [--rounds 4] [--seconds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import load_model, run_for
from bench.sweeps import photos
from inspectd.detectors import cpu_threads
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, prepare, run


def parallel_op() -> None:
    torch.randn(512, 512) @ torch.randn(512, 512)  # a multi-threaded op: the calling thread gets a team


def rate(items: list[ScoreItem], seconds: float) -> tuple[float, float]:
    """(frames/s, kernel ms per frame) of scoring ``items`` again and again for ``seconds``."""
    got = run_for(lambda: run(items), len(items), seconds)
    return got["frames_per_s"], got["kernel_ms_per_frame"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    backbone = load_model("tiny", Path(tempfile.mkdtemp()))
    detector = create_detector("winclip", backbone)
    state = detector.fit(ProductSpec("p", "hazelnut"), photos("good", 2))
    items = [ScoreItem(detector, state, f) for f in photos("colour", 4, (240, 240))]
    prepare(items)
    other = ThreadPoolExecutor(1)  # an idle thread that outlives its torch work, as the daemon's loader
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for mode in ("one team", "an idle second team"):
            other.submit(cpu_threads.release_team if mode == "one team" else parallel_op).result()
            got = rate(items, args.seconds)
            if got[0] > best.get(mode, (0.0, 0.0))[0]:
                best[mode] = got
    print(f"torch threads {torch.get_num_threads()}; tiny WinCLIP 4-shot, batches of 4 240-px frames, best of "
          f"{args.rounds} rounds of {args.seconds:.0f} s")
    for mode, (frames_s, sys_ms) in best.items():
        print(f"{mode:22s} {frames_s:7.1f} frames/s, {sys_ms:.2f} ms kernel time a frame")
    print(f"one team / idle second team: {best['one team'][0] / best['an idle second team'][0]:.2f}x")
    other.shutdown()


if __name__ == "__main__":
    main()
