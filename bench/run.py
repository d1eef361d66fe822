"""One benchmark report for every detector: runs the physical-peak kernel, the GEMM bounds, every detector's scoring
and fit, the daemon through Redis, the cost sweeps and bf16 in one process, and writes one Markdown + JSON report.

    python -m bench.run --quick                    # under 10 minutes on a 2-core CPU
    python -m bench.run [--out bench/report] [--device auto|cpu|cuda] [--sections peak detectors daemon ...]

Per-detector rows use the real ViT-B-16-plus-240 architecture with seeded random weights (timing only); the daemon
and the sweeps use the tiny model unless told otherwise (the report names the model of every section). Ratios are
taken against ceilings measured in the same run: the physical peak and the GEMM bound are measured at the start and
at the end, and the higher of the two is used (this VM's neighbours only ever slow a measurement down).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import gpu
from bench.report import evaluate_targets, write_report
from inspectd import allocator

SECTIONS = ("peak", "detectors", "daemon", "sweeps", "bf16", "compile", "gpu")
DEFAULT_OUT = Path(__file__).resolve().parent / "report"
VIT = "ViT-B-16-plus-240"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="0- and 4-shot only, 2-frame batches, short fit schedules, tiny-model sweeps and daemon")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for report.md + report.json, or a .md file name (default: bench/report)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--arch", default=VIT, help="the per-detector rows' CLIP arch (random weights)")
    parser.add_argument("--detectors", nargs="+", default=None, help="subset of winclip randword aprilgan promptad "
                                                                     "anople")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--sweep-model", default="tiny", help="model of the cost sweeps: tiny or an open_clip arch")
    parser.add_argument("--compile-arch", default=None,
                        help="model of the compile section (default: tiny on a CPU under --quick, else --arch)")
    parser.add_argument("--daemon-arch", nargs="+", default=None,
                        help="models of the daemon section (default: inspectd-tiny; without --quick also the ViT)")
    return parser.parse_args(argv)


class Run:
    """The results dict being filled, section by section; a failing section records its error and the run goes on."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.results: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.rss_after: dict[str, float] = {}

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {message}", file=sys.stderr, flush=True)

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        from bench.sweeps import rss_mib

        self.log(f"{name} ...")
        started, load = time.perf_counter(), os.getloadavg()[0]
        try:
            out = fn()
        except Exception as exc:  # one broken section (no Redis, no gcc, ...) must not lose the others
            traceback.print_exc()
            out = {"error": f"{type(exc).__name__}: {exc}"}
        out.setdefault("seconds", time.perf_counter() - started)
        out.setdefault("load_average", [load, os.getloadavg()[0]])
        self.results[name] = out
        self.rss_after[name] = rss_mib()
        self.log(f"{name}: {out['seconds']:.0f} s")
        return out


def meta(args: argparse.Namespace, device: str, argv: Sequence[str]) -> dict[str, Any]:
    from bench.peak import cpu_model

    return {"mode": "quick" if args.quick else "full", "command": "python -m bench.run " + shlex.join(argv),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}


def measure_ceilings(run: Run, width: int) -> dict[str, Any]:
    """The physical peak (CPU) and the GEMM rates; on a GPU the tensor-core peak is the GEMM bound."""
    from bench.peak import gemm_rates, physical_peak

    out: dict[str, Any] = {"physical": physical_peak()}
    if gpu.is_cuda(run.device):
        section = run.results.get("gpu") or gpu.gpu_section(run.device, run.args.quick)
        tensor_core = section.get("tensor_core_bf16_gflops") or section.get("tensor_core_fp16_gflops")
        out["gemm"] = {"bound_fp32": tensor_core, "bound_bf16": section.get("tensor_core_bf16_gflops")}
        out["notes"] = ["GPU rows: the GEMM bound is the tensor-core peak (large half-precision matmul); the "
                        "physical peak above is the host CPU's"]
    else:
        out["gemm"] = gemm_rates(width, run.device)
    return out


def merge_ceilings(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The higher of the start and end measurement of every ceiling (both kept, as ..._start / ..._end). A physical
    peak taken from the end comes with its own companions (``fp32_basis``, ``fp32_gflops_all_threads``,
    ``fp32_gflops_1thread``, ...), so the report's "taken from ..." line states the figures that make it."""
    merged = {**first, "physical": dict(first["physical"]), "gemm": dict(first["gemm"])}
    for part in ("physical", "gemm"):
        later = second.get(part, {})
        for key, value in later.items():
            before = first.get(part, {}).get(key)
            rate = key.endswith("gflops") or key.startswith(("mm_", "bound_"))
            if rate and isinstance(value, float) and isinstance(before, float):
                merged[part][key] = max(before, value)
                merged[part][f"{key}_start"], merged[part][f"{key}_end"] = before, value
                if part == "physical" and value > before:
                    kind = key.removesuffix("gflops")
                    merged[part].update({k: v for k, v in later.items() if k.startswith(kind) and k != key
                                         and not k.endswith("gflops")})
    return merged


def bounds_of(ceilings: dict[str, Any], device: str) -> dict[str, float | None]:
    physical, gemm = ceilings.get("physical", {}), ceilings.get("gemm", {})
    return {"gemm": gemm.get("bound_fp32"),
            "peak": None if gpu.is_cuda(device) else physical.get("fp32_gflops"),
            "bf16_gemm": gemm.get("bound_bf16"),
            "bf16_peak": None if gpu.is_cuda(device) else physical.get("bf16_gflops")}


def daemon_plan(arch: str, quick: bool, device: str) -> tuple[int, tuple[int, ...]]:
    """(frames per run, batch limits) of the daemon section for ``arch`` on ``device``."""
    if arch == "inspectd-tiny":  # whole batches at every limit; two limits >= 4 to judge
        if gpu.is_cuda(device):  # thousands of frames a second: 128 would time a window of a few ms
            return (1024 if quick else 4096), (1, 4, 16)
        return (128 if quick else 320), (1, 4, 16)
    if gpu.is_cuda(device):  # hundreds of ViT frames a second: enough frames for many micro-batches
        return (1024 if quick else 4096), ((32,) if quick else (16, 32, 64))
    # 16 ViT frames = 4 batches of 4 on a CPU: with 2 batches the first read and the last publish are a visible
    # share of the run (0.94 with 8 frames vs 0.98 with 16, same machine, same hour)
    return 16, ((4,) if quick else (4, 8))


CAMERA_INPUT = "1080p JPEG, model.resize fast"


def daemon_rows(archs: Sequence[str], quick: bool, device: str) -> list[tuple[str, int, int, bool]]:
    """(arch, frames, batch limit, camera) of every daemon row: each arch at its batch limits, and on a GPU one row
    of what a line sends at the GPU's rate (1080p JPEGs under model.resize: fast): can decode keep up?"""
    rows = []
    for arch in archs:
        frames, batches = daemon_plan(arch, quick, device)
        rows += [(arch, frames, batch, False) for batch in batches]
    if gpu.is_cuda(device):
        frames, batches = daemon_plan(archs[-1], quick, device)
        rows.append((archs[-1], frames, batches[-1], True))
    return rows


def daemon_section(run: Run) -> dict[str, Any]:
    from bench.daemon import REPEATS, build_backbone, config, measure

    archs = run.args.daemon_arch or (["inspectd-tiny"] if run.args.quick and not gpu.is_cuda(run.device)
                                     else ["inspectd-tiny", run.args.arch])
    precision = gpu.precision_name(gpu.half_dtype(run.device))  # as the detector rows: bf16 on a GPU
    rows = []

    async def measure_all() -> None:
        backbones: dict[tuple[str, bool], Any] = {}
        for arch, frames, batch, camera in daemon_rows(archs, run.args.quick, run.device):
            if (arch, camera) not in backbones:  # a camera row's model decodes and resizes with model.resize: fast
                backbones[(arch, camera)] = build_backbone(config(arch, 1, "x", precision=precision, device=run.device,
                                                                  resize="fast" if camera else "exact"))
            row = await measure(arch, batch, frames, 240, backbones[(arch, camera)], -1, precision=precision,
                                device=run.device, camera=camera)
            rows.append({"arch": arch, "frames": frames, **({"input": CAMERA_INPUT} if camera else {}), **row})
            run.log(f"  daemon {arch}{' ' + CAMERA_INPUT if camera else ''} batch {batch}: engine "
                    f"{row['engine']:.1f}, e2e {row['e2e']:.1f} img/s")

    asyncio.run(measure_all())
    return {"rows": rows, "how": "bench/daemon.py against the real Redis on 127.0.0.1:6379: engine-only = decode + "
            "tile + score in one thread, no Redis/asyncio (on a GPU: score alone, the frames decoded beforehand, as "
            "the daemon's decode pool works beside the GPU); end-to-end = XADD -> daemon -> XADD results -> XACK with "
            "all frames waiting (saturation; timed from the first batch written after the producer added the last "
            "frame, so its XADDs are not inside, where a quarter of the results and two batches came after it, else "
            "from the first batch: the JSON rows' windows_after_producer count them); rates are medians of "
            f"{REPEATS} alternating runs, e2e / engine the "
            "median of the adjacent pairs' ratios; latency with open-loop "
            f"arrivals at 50 % and 90 % of the measured end-to-end saturation rate; 240-px PNG frames unless the "
            f"row says (on a GPU one row of {CAMERA_INPUT}), WinCLIP, on {run.device} in {precision}."}


def detectors_section(run: Run, backbone: Any, tmp: Path) -> dict[str, Any]:
    from bench.detectors import DETECTORS, Plan, detector_rows

    plan = Plan.make(run.args.quick, run.device)
    rows, fits = detector_rows(backbone, run.args.detectors or DETECTORS, plan, tmp, run.log)
    described = backbone.describe()
    gemms = f", GEMMs {described['gemm']}" if described.get("gemm") else ""
    return {"rows": rows, "fits": fits, "model": f"{backbone.spec.arch} (seeded random weights) on "
            f"{backbone.device}, {backbone.dtype}, kernels {described.get('kernels')}{gemms}",
            "frames": f"batches of {plan.batch} 512-px hazelnut_toy frames; best batch of {plan.rounds} rounds that "
            "time every setting in turn (a cheap setting several times a round, >= 1 s); references: hazelnut_toy "
            "good images; GFLOP/img counted by torch's FlopCounterMode (+ oneDNN linears, CPU SDPA, "
            "nn.MultiheadAttention's inference kernel) on the warm-up batch; pre-processing not timed",
            "plan": plan.__dict__}


def bf16_runnable(run: Run) -> str | None:
    """None when bf16 can be measured here, else why not."""
    if gpu.is_cuda(run.device):
        return None if torch.cuda.is_bf16_supported() else "not run: this GPU has no bf16"
    from bench.peak import cpu_bf16_missing

    missing = cpu_bf16_missing()
    return f"not run: {missing}" if missing else None


def bf16_part(run: Run, fp32: Any, tmp: Path) -> dict[str, Any]:
    from bench.common import load_model
    from bench.detectors import Plan, bf16_section

    why_not = bf16_runnable(run)
    if why_not:
        return {"note": why_not}
    if fp32 is None or fp32.dtype != torch.float32:  # on a GPU the rows' model is half precision
        fp32 = load_model(run.args.arch, tmp, run.device, precision="fp32")
    bf16 = load_model(run.args.arch, tmp, run.device, precision="bf16")
    fp32_rows = run.results.get("detectors", {}).get("rows", [])
    out = bf16_section(fp32, bf16, Plan.make(run.args.quick, run.device), fp32_rows)
    out["model"] = f"{bf16.spec.arch} (seeded random weights), kernels {bf16.describe().get('kernels')}"
    return out


def compile_part(run: Run, tmp: Path) -> dict[str, Any]:
    from bench.compile import compile_section

    arch = run.args.compile_arch or ("tiny" if run.args.quick and not gpu.is_cuda(run.device) else run.args.arch)
    return compile_section(arch, tmp, run.device, run.args.quick, run.log)


def sweeps_section(run: Run, tmp: Path) -> dict[str, Any]:
    from bench.common import load_model
    from bench.sweeps import run_sweeps

    return run_sweeps(load_model(run.args.sweep_model, tmp, run.device), run.args.quick)


def finish(run: Run) -> None:
    from bench.detectors import add_ratios
    from bench.sweeps import rss_mib

    bounds = bounds_of(run.results.get("peak", {}), run.device)
    add_ratios(run.results.get("detectors", {}).get("rows", []), bounds)
    add_ratios(run.results.get("bf16", {}).get("rows", []), bounds)
    run.results["memory"] = {"peak_rss_mib": rss_mib(), "rss_after": run.rss_after, "gpu": gpu.peak_memory(run.device)}
    run.results["meta"]["wall_s"] = round(time.perf_counter() - run.started, 1)
    run.results["meta"]["bounds"] = {k: (round(v, 1) if v else v) for k, v in bounds.items()}
    run.results["targets"] = evaluate_targets(run.results)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    allocator.apply("keep")  # the daemon's default: every section's tensors come from the heap as they would there
    device = gpu.choose_device(args.device)
    run = Run(args, device)
    run.results["meta"] = meta(args, device, argv)
    wanted = set(args.sections)
    gpu.reset_peak_memory(device)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp_name:
        tmp = Path(tmp_name)
        if "gpu" in wanted:
            run.section("gpu", lambda: gpu.gpu_section(device, args.quick))
        backbone = None
        if wanted & {"detectors", "bf16"}:
            from bench.common import load_model

            run.log(f"loading {args.arch} ...")
            backbone = load_model(args.arch, tmp, device, gpu.precision_name(gpu.half_dtype(device)))
        width = backbone.width if backbone is not None else 896
        first: dict[str, Any] = {}
        if "peak" in wanted:
            first = run.section("peak", lambda: measure_ceilings(run, width))
        if "detectors" in wanted:
            run.section("detectors", lambda: detectors_section(run, backbone, tmp))
        if "bf16" in wanted:
            run.section("bf16", lambda: bf16_part(run, backbone, tmp))
        backbone = None
        if "compile" in wanted:
            run.section("compile", lambda: compile_part(run, tmp))
        if "daemon" in wanted:
            run.section("daemon", lambda: daemon_section(run))
        if "sweeps" in wanted:
            run.section("sweeps", lambda: sweeps_section(run, tmp))
        if "peak" in wanted and "error" not in first:
            again = measure_ceilings(run, width)
            run.results["peak"] = {**merge_ceilings(first, again), "seconds": first["seconds"],
                                   "load_average": first["load_average"]}
    finish(run)
    markdown, data = write_report(run.results, args.out)
    run.log(f"wrote {markdown} and {data} ({run.results['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
