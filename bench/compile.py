"""`model.compile` measured against the tower it replaces: WinCLIP zero-shot (the GPU headline) scored by the same
seeded model eager (on a CPU: the oneDNN fused blocks; on a GPU: open_clip's modules in half precision) and
torch.compile'd in each mode, all timed in turn in one run, with each mode's first batch (its compile) and the
largest score and map difference against eager on the same frames.

    python -m bench.compile [--arch tiny|ViT-B-16-plus-240] [--device auto] [--quick]

bench.run's "compile" section runs the same (there: the tiny model on a CPU under --quick, the detectors' arch
otherwise)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import gpu
from bench.common import load_model
from bench.detectors import Plan, time_settings
from bench.sweeps import photos
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, prepare, run

CPU_MODES = ("off", "default")
GPU_MODES = ("off", "default", "reduce-overhead")


def compile_section(arch: str, tmp: Path, device: str, quick: bool, log: Any = print) -> dict[str, Any]:
    plan = Plan.make(quick, device)
    dtype = gpu.half_dtype(device)
    sync = gpu.synchronizer(device)
    frames = photos("colour", plan.batch)
    modes = GPU_MODES if gpu.is_cuda(device) else CPU_MODES
    settings: dict[str, list[ScoreItem]] = {}
    first_s: dict[str, float] = {}
    outputs: dict[str, list] = {}
    kernels: dict[str, str] = {}
    for mode in modes:
        backbone = load_model(arch, tmp, device, gpu.precision_name(dtype), compile=mode)
        kernels[mode] = backbone.describe()["kernels"]
        detector = create_detector("winclip", backbone, {})
        state = detector.fit(ProductSpec("hazelnut", "hazelnut"), [])
        items = [ScoreItem(detector, state, f) for f in frames]
        prepare(items)
        started = time.perf_counter()
        with gpu.autocast(device, dtype):
            outputs[mode] = run(items)
        sync()
        first_s[mode] = time.perf_counter() - started
        settings[mode] = items
        log(f"  compile {mode}: first batch {first_s[mode]:.1f} s ({kernels[mode]})")
    best = time_settings(settings, device, plan.rounds, dtype)
    eager = outputs["off"]
    rows = []
    for mode in modes:
        got = outputs[mode]
        rows.append({"mode": mode, "kernels": kernels[mode], "images_per_s": plan.batch / best[mode],
                     "speedup_vs_off": best["off"] / best[mode], "first_batch_s": first_s[mode],
                     "max_abs_score_diff": max(abs(a.score - b.score) for a, b in zip(got, eager, strict=True)),
                     "max_abs_map_diff": max(float(np.abs(a.map - b.map).max())
                                             for a, b in zip(got, eager, strict=True))})
        log(f"  compile {mode}: {rows[-1]['images_per_s']:.2f} images/s, {rows[-1]['speedup_vs_off']:.2f}x off")
    return {"rows": rows, "model": f"{arch} (seeded random weights) on {device}, {gpu.precision_name(dtype)}",
            "frames": f"WinCLIP 0-shot, batches of {plan.batch} 512-px hazelnut_toy frames, best of {plan.rounds} "
                      "rounds timed in turn; first batch = the first scoring after load (torch.compile compiles "
                      "the batch's shapes there)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = gpu.choose_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        section = compile_section(args.arch, Path(tmp), device, args.quick)
    print(section["model"], "-", section["frames"])
    for row in section["rows"]:
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
