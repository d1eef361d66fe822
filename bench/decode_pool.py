"""The decode pool's throughput (`ScoringEngine.prepare`: decode + the detector's pre-processing, what feeds a GPU
engine) with its workers' torch ops on one thread each (the engine's pool) vs on torch's thread count (as a plain
pool leaves them), interleaved in one run, for JPEG frames of several sizes.

    python -m bench.decode_pool [--frames 32] [--threads 2] [--rounds 5]

Each worker opens its own OpenMP team of torch's thread count when its ops are left at it: with as many workers
as cores, the teams outnumber the cores and every parallel region waits for a preempted thread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import load_model
from bench.daemon import camera_frames
from bench.sweeps import FRAME_SIZES
from inspectd.daemon.engine import ScoringEngine
from inspectd.detectors.base import create_detector
from inspectd.streams.schema import Frame


async def frames_per_s(engine: ScoringEngine, detector: object, payloads: list[bytes]) -> float:
    frames = [Frame("p", "l", str(i), 0.0, payload=p) for i, p in enumerate(payloads)]
    started = time.perf_counter()
    prepared = await engine.prepare(frames, lambda _product: detector)
    seconds = time.perf_counter() - started
    assert all(getattr(p, "tiles", None) is not None for p in prepared), "a frame failed to prepare"
    return len(frames) / seconds


async def measure(threads: int, n: int, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_model("tiny", Path(tmp))
    detector = create_detector("winclip", backbone)
    single = ScoringEngine([torch.device("cuda")], threads)  # the daemon's GPU-side pool (no GPU is touched)
    shared = ScoringEngine([torch.device("cuda")], threads)
    shared._decode.shutdown()
    shared._decode = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="plain-decode")
    rows = []
    try:
        for name, size in FRAME_SIZES.items():
            payloads = camera_frames(n, size)
            best = {"one torch thread per worker": 0.0, "torch's thread count per worker": 0.0}
            for _ in range(rounds):
                best["one torch thread per worker"] = max(best["one torch thread per worker"],
                                                          await frames_per_s(single, detector, payloads))
                best["torch's thread count per worker"] = max(best["torch's thread count per worker"],
                                                              await frames_per_s(shared, detector, payloads))
            rows.append({"frame": name, **best})
    finally:
        single.close()
        shared.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="decode pool workers")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.threads, args.frames, args.rounds))
    print(f"decode pool of {args.threads} workers, torch threads {torch.get_num_threads()}, {args.frames} JPEG "
          f"frames per round, best of {args.rounds} rounds (frames/s)")
    print("| frame | one torch thread per worker | torch's thread count per worker | ratio |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        one, many = row["one torch thread per worker"], row["torch's thread count per worker"]
        print(f"| {row['frame']} | {one:.1f} | {many:.1f} | {one / many:.2f} |")


if __name__ == "__main__":
    main()
