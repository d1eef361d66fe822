"""The benchmark report's CUDA path: device choice, the half-precision autocast dtype, synchronised timing,
host-to-device transfer rates (pinned vs pageable), the tensor-core peak (a large bf16/fp16 matmul) and peak GPU
memory.
Without a CUDA device every GPU figure of the report says "not measured (no CUDA device)"."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

NO_GPU = "not measured (no CUDA device)"
NO_GPU_MEMORY = "not measured: no GPU"


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def choose_device(requested: str, has_cuda: bool | None = None) -> str:
    """The device the report runs on: "auto" is the first GPU when there is one, else the CPU; asking for CUDA on a
    machine without it is an error, not a silent CPU run."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested.startswith("cuda") and not has_cuda:
        raise ValueError(f"--device {requested}: no CUDA device here (use --device cpu or auto)")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    return requested


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def half_dtype(device: str, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast / model dtype of GPU rows: bf16 where the GPU supports it (Ampere and later), else fp16; None on
    the CPU (fp32 there; bf16 on a CPU is a separate, explicit row)."""
    if not is_cuda(device):
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """ModelSpec.precision for ``dtype`` (None = fp32)."""
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def autocast(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast on CUDA with the half dtype (catches detector-side fp32 matmuls), nothing on the CPU."""
    if dtype is None or not is_cuda(device):
        yield
        return
    with torch.autocast("cuda", dtype=dtype):
        yield


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading the clock: torch.cuda.synchronize on a GPU (its kernels are asynchronous)."""
    if is_cuda(device):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_best(fn: Callable[[], object], device: str, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall seconds of ``fn`` over ``repeats`` runs, synchronised on a GPU before and after each."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def transfer_rates(device: str, megabytes: int = 256, repeats: int = 5) -> dict[str, float]:
    """Host-to-device GB/s from pinned and from pageable memory."""
    host = torch.empty(megabytes * (1 << 20), dtype=torch.uint8)
    pinned = host.pin_memory()
    target = torch.empty_like(host, device=device)
    rates = {}
    for name, source in (("pinned", pinned), ("pageable", host)):
        seconds = timed_best(lambda source=source: target.copy_(source, non_blocking=True), device, repeats)
        rates[f"h2d_{name}_gbps"] = host.numel() / seconds / 1e9
    return rates


def tensor_core_peak(device: str, dtype: torch.dtype, n: int = 8192, repeats: int = 5) -> float:
    """GFLOP/s of one large square ``dtype`` matmul on the GPU (what its tensor cores sustain through cuBLAS)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed_best(lambda: torch.mm(a, b), device, repeats)
    return 2 * n ** 3 / seconds / 1e9


def reset_peak_memory(device: str) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated / reserved on a GPU; on the CPU the note that it was not measured."""
    if not is_cuda(device):
        return {"measured": False, "note": NO_GPU_MEMORY}
    return {"measured": True, "max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "max_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}


def gpu_section(device: str, quick: bool = True) -> dict[str, Any]:
    """The report's GPU facts: name, tensor-core bf16/fp16 peaks, transfer rates; "not measured" on the CPU."""
    if not is_cuda(device):
        return {"measured": False, "note": NO_GPU}
    props = torch.cuda.get_device_properties(device)
    n = 4096 if quick else 8192
    section: dict[str, Any] = {"measured": True, "name": props.name, "memory_bytes": int(props.total_memory),
                               "capability": f"{props.major}.{props.minor}",
                               "autocast_dtype": precision_name(half_dtype(device))}
    if torch.cuda.is_bf16_supported():
        section["tensor_core_bf16_gflops"] = tensor_core_peak(device, torch.bfloat16, n)
    section["tensor_core_fp16_gflops"] = tensor_core_peak(device, torch.float16, n)
    section.update(transfer_rates(device, 64 if quick else 256))
    return section
