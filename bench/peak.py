"""This machine's FLOP ceilings: the physical peak of the CPU (bench/fma_peak.c, an FMA-throughput microkernel
compiled with gcc at run time, with AMX tiles where the CPU has them) and the best library GEMM rates (torch.mm and
the GEMM bound of bench/common.py) measured in the same run.

    python -m bench.peak            # prints the JSON of both
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import fp32_flop_bound, matmul_gflops
from inspectd.detectors import fused

KERNEL_SOURCE = Path(__file__).with_name("fma_peak.c")
CFLAGS = ["-O2", "-march=native", "-pthread"]


def cpu_model(cpuinfo: str | None = None) -> str:
    """The "model name" of /proc/cpuinfo, with the family/model numbers when the name is generic."""
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "") or "unknown CPU"
    if "cpu family" in fields:
        core = amd_core(fields["cpu family"], fields.get("model", "")) if fields.get("vendor_id") == "AuthenticAMD" \
            else None
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')}{', ' + core if core else ''})"
    return name


def amd_core(family: str, model: str) -> str | None:
    """AMD's core generation from /proc/cpuinfo's family and model (generic VM model names hide it), by the model
    ranges Linux uses (arch/x86/kernel/cpu/amd.c); None outside them. It matters here: Zen 4 runs AVX-512 on
    256-bit units, Zen 5 server parts on 512-bit ones: twice the fp32 peak per clock, and the same GEMM kernels
    reach a smaller share of it."""
    try:
        fam, mod = int(family), int(model)
    except ValueError:
        return None
    for name, ranges in _AMD_CORES.get(fam, ()):
        if any(low <= mod <= high for low, high in ranges):
            return name
    return None


_AMD_CORES: dict[int, tuple[tuple[str, tuple[tuple[int, int], ...]], ...]] = {
    0x17: (("Zen / Zen+", ((0x00, 0x2F), (0x50, 0x5F))),
           ("Zen 2", ((0x30, 0x4F), (0x60, 0x7F), (0x90, 0x91), (0xA0, 0xAF)))),
    0x19: (("Zen 3", ((0x00, 0x0F), (0x20, 0x5F))), ("Zen 4", ((0x10, 0x1F), (0x60, 0xAF)))),
    0x1A: (("Zen 5", ((0x00, 0x2F), (0x40, 0x4F), (0x60, 0x7F))),
           ("Zen 6", ((0x50, 0x5F), (0x80, 0xAF), (0xC0, 0xEF)))),
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def kernel_isa(flags: set[str]) -> str | None:
    """The vector ISA the fp32 kernel uses: AVX-512 when the CPU has avx512f, else AVX2 + FMA, else None."""
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return None


BF16_INSTRUCTIONS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of bf16 dot products
NO_BF16_INSTRUCTIONS = "this CPU has no bf16 dot-product instructions (avx512_bf16 / amx_bf16)"


def bf16_note(flags: set[str], amx_note: str | None = None) -> str:
    """What the bf16 peak is measured with here, or why it is not; ``amx_note`` is the kernel's word on why its AMX
    part did not run (gcc too old for AMX, the OS refused tile data)."""
    ways = []
    if "avx512_bf16" in flags:
        ways.append("vdpbf16ps (AVX512_BF16), 64 flops per 512-bit instruction")
    if "amx_bf16" in flags and "amx_tile" in flags:
        ways.append(f"not AMX: {amx_note}" if amx_note else
                    "AMX TDPBF16PS on four 16x16 fp32 tiles, 16 384 flops per instruction")
    if not ways:
        return f"not measured: {NO_BF16_INSTRUCTIONS}"
    return "the faster of " + " and ".join(ways) if len(ways) > 1 and not amx_note else "; ".join(ways)


def compile_flags(flags: set[str]) -> list[str]:
    """gcc flags: -march=native, and -mno-avx512f where the CPU has no AVX-512 (so the AVX2 path is built)."""
    extra = [] if "avx512f" in flags else ["-mno-avx512f"]
    return [*CFLAGS, *extra]


def build_kernel(workdir: Path, flags: set[str] | None = None, compiler: str | None = None) -> tuple[Path | None, str]:
    """(binary, "gcc VERSION FLAGS") or (None, why not)."""
    flags = cpu_flags() if flags is None else flags
    gcc = compiler or shutil.which("gcc")
    if gcc is None:
        return None, "gcc not found: physical peak not measured (ratios to it omitted)"
    if kernel_isa(flags) is None:
        return None, "the CPU has neither AVX-512 nor AVX2 + FMA: physical peak not measured"
    binary = workdir / "fma_peak"
    command = [gcc, *compile_flags(flags), str(KERNEL_SOURCE), "-o", str(binary)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return None, f"gcc failed ({done.stderr.strip()[-300:]}): physical peak not measured"
    version = subprocess.run([gcc, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    return binary, f"gcc {version} {' '.join(compile_flags(flags))}"


def run_kernel(binary: Path, threads: int, seconds: float = 0.1, runs: int = 3) -> dict[str, Any]:
    """The kernel's JSON, best of ``runs`` invocations per figure (this VM's neighbours only ever slow it)."""
    best: dict[str, Any] = {}
    for _ in range(runs):
        out = subprocess.run([str(binary), str(threads), str(seconds)], capture_output=True, text=True,
                             timeout=300, check=True)
        result = json.loads(out.stdout)
        for key, value in result.items():
            if isinstance(value, float) and key != "sink":
                best[key] = max(best.get(key, 0.0), value)
            else:
                best.setdefault(key, value)
    best.pop("sink", None)
    return best


def physical_peak(threads: int | None = None, seconds: float = 0.1, cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's fp32 (and, with avx512_bf16, bf16) FMA peak on ``threads`` threads (default: torch's)."""
    flags = cpu_flags(cpuinfo)
    threads = threads or torch.get_num_threads()
    result: dict[str, Any] = {"cpu": cpu_model(cpuinfo), "threads": threads, "isa": kernel_isa(flags),
                              "bf16_note": bf16_note(flags), "amx_bf16": "amx_bf16" in flags,
                              "avx512_bf16": "avx512_bf16" in flags}
    with tempfile.TemporaryDirectory(prefix="fma_peak-") as tmp:
        binary, how = build_kernel(Path(tmp), flags)
        if binary is None:
            return {**result, "measured": False, "reason": how, "fp32_gflops": None, "bf16_gflops": None}
        try:
            measured = run_kernel(binary, threads, seconds)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:  # a crash, a time-out, bad output
            return {**result, "measured": False, "reason": f"the kernel failed ({exc}): physical peak not measured",
                    "fp32_gflops": None, "bf16_gflops": None}
    result["bf16_note"] = bf16_note(flags, measured.get("amx_note"))
    return {**result, **measured, **peak_of(measured, threads), "measured": True, "build": how}


def peak_of(measured: dict[str, Any], threads: int) -> dict[str, Any]:
    """The peak per precision: the all-thread rate, or the 1-thread rate x threads where that is higher (a core
    that another process holds for a moment slows the all-thread run, rarely a 1-thread one). Keeps the all-thread
    figure as ``..._all_threads`` and says which one was taken. The bf16 peak is the faster of the two bf16
    instructions: on a CPU with AMX tiles the vector dot product (kept as ``dot_bf16_...``) is not the ceiling a
    bf16 GEMM runs against."""
    out: dict[str, Any] = {}
    for kind in ("fp32", "bf16", "amx_bf16"):
        every, one = measured.get(f"{kind}_gflops"), measured.get(f"{kind}_gflops_1thread")
        if every is None:
            continue
        scaled = (one or 0.0) * threads
        out[f"{kind}_gflops_all_threads"] = every
        out[f"{kind}_gflops"] = max(every, scaled)
        out[f"{kind}_basis"] = "all threads" if every >= scaled else f"1 thread x {threads}"
    if out.get("amx_bf16_gflops", 0.0) > out.get("bf16_gflops", 0.0):
        for key in ("gflops_all_threads", "gflops", "basis"):
            if f"bf16_{key}" in out:
                out[f"dot_bf16_{key}"] = out[f"bf16_{key}"]
            out[f"bf16_{key}"] = out[f"amx_bf16_{key}"]
        out["dot_bf16_gflops_1thread"] = measured.get("bf16_gflops_1thread")
        out["bf16_gflops_1thread"] = measured.get("amx_bf16_gflops_1thread")
        out["dot_bf16_isa"], out["bf16_isa"] = measured.get("bf16_isa"), "amx_bf16 tdpbf16ps"
    return out


def gemm_rates(width: int, device: str = "cpu", square: int = 2048) -> dict[str, Any]:
    """Library GEMM rates in GFLOP/s: torch.mm on a large square fp32 and bf16 product, and the fp32 / bf16
    GEMM bound the other benches rate against (best kernel at square and the ViT's own shapes)."""
    rates: dict[str, Any] = {"mm_fp32": matmul_gflops(torch.float32, square, device),
                             "bound_fp32": fp32_flop_bound(width, device, torch.float32),
                             "square": float(square), "width": float(width)}
    rates["bound_fp32"] = max(rates["bound_fp32"], rates["mm_fp32"])
    rates["bf16_skipped"] = bf16_gemm_skipped(device)
    if rates["bf16_skipped"]:  # torch's reference bf16 loops: minutes of the --quick budget for no ceiling
        rates["mm_bf16"] = rates["bound_bf16"] = None
    else:
        rates["mm_bf16"] = matmul_gflops(torch.bfloat16, square, device)
        rates["bound_bf16"] = max(fp32_flop_bound(width, device, torch.bfloat16), rates["mm_bf16"])
    return rates


def cpu_bf16_missing() -> str | None:
    """Why this CPU cannot run bf16 worth measuring, else None: no oneDNN bf16 kernels (torch's reference loops
    instead), or no bf16 dot products (`BF16_INSTRUCTIONS`: oneDNN emulates bf16, and there is no peak to rate it)."""
    if not fused.onednn_bf16():
        return fused.NO_ONEDNN_BF16
    if not BF16_INSTRUCTIONS & cpu_flags():
        return f"{NO_BF16_INSTRUCTIONS} (oneDNN would emulate bf16)"
    return None


def bf16_gemm_skipped(device: str) -> str | None:
    """Why bf16 GEMMs are not timed on ``device`` (see `cpu_bf16_missing`), else None."""
    missing = None if device != "cpu" else cpu_bf16_missing()
    return f"not measured: {missing}" if missing else None


def main() -> int:
    print(json.dumps({"peak": physical_peak(), "gemm": gemm_rates(896)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
