"""The daemon's `allocator: keep` (freed tensor memory stays in the heap) vs glibc's defaults (`system`): the tiny
model scoring batches on a thread of its own (as the daemon's engine), page faults and kernel time per frame,
frames/s and peak RSS. glibc's dynamic defaults cannot be put back in a process once changed, so each measurement
is a fresh child process, the two choices in turn, in one run.

    python -m bench.allocator [--rounds 3] [--batch 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from inspectd import allocator
from inspectd.detectors import cpu_threads


def child(choice: str, batch: int, seconds: float) -> dict[str, Any]:
    """In this process: apply ``choice``, load the tiny model and score batches of ``batch`` 240-px PNG frames with
    WinCLIP 2-shot as the daemon's CPU engine does (decode, pre-process, score, on a thread of its own) for
    ``seconds`` after a warm-up; what it cost per frame."""
    applied = allocator.apply(choice)
    from bench.common import load_model, run_for
    from bench.daemon import frames as png_frames
    from bench.daemon import prepare_payloads, score_prepared
    from bench.sweeps import photos
    from inspectd.daemon.engine import ScoringEngine
    from inspectd.detectors.base import ProductSpec, create_detector

    backbone = load_model("tiny", Path(tempfile.mkdtemp()))
    detector = create_detector("winclip", backbone)
    state = detector.fit(ProductSpec("p", "hazelnut"), photos("good", 2))
    engine = ScoringEngine([backbone.device], decode_threads=0)
    payloads = png_frames(batch, 240)
    cpu_threads.release_team()  # the engine thread's team must be the only one (bench/openmp.py)

    def one_batch() -> None:
        score_prepared(detector, state, prepare_payloads(engine, detector, payloads))

    try:  # on the engine's own thread
        measured = engine._engine.submit(run_for, one_batch, batch, seconds, 3, 5).result()  # >= 5 batches
    finally:
        engine.close()
    return {"choice": choice, "applied": applied, **measured,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(choice: str, batch: int, seconds: float) -> dict[str, Any]:
    """`child` in a fresh interpreter (this package's root on its path)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.allocator", "--child", choice, "--batch", str(batch),
                          "--seconds", str(seconds)], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench.allocator --child {choice} exited {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--child", choices=allocator.CHOICES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seconds)))
        return
    rows: dict[str, list[dict[str, Any]]] = {choice: [] for choice in allocator.CHOICES}
    for i in range(args.rounds):
        for choice in allocator.CHOICES if i % 2 == 0 else allocator.CHOICES[::-1]:
            rows[choice].append(measure(choice, args.batch, args.seconds))
    print(f"tiny WinCLIP 2-shot, batches of {args.batch} 240-px PNG frames decoded and scored on the engine thread, "
          f"{args.rounds} child processes each, {args.seconds:.0f} s timed; best frames/s, median of the rest")
    print(f"{'allocator':10s} {'frames/s':>9s} {'faults/frame':>13s} {'kernel ms/frame':>16s} {'peak RSS MiB':>13s}")
    best = {}
    for choice, measured in rows.items():
        best[choice] = max(r["frames_per_s"] for r in measured)
        faults = sorted(r["faults_per_frame"] for r in measured)[len(measured) // 2]
        kernel = sorted(r["kernel_ms_per_frame"] for r in measured)[len(measured) // 2]
        rss = max(r["peak_rss_mib"] for r in measured)
        print(f"{choice:10s} {best[choice]:9.1f} {faults:13.1f} {kernel:16.2f} {rss:13.0f}")
    print(f"keep / system frames/s: {best['keep'] / best['system']:.2f}x")


if __name__ == "__main__":
    main()
