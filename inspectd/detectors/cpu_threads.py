"""torch's CPU intra-op thread count, set without the MKL side effect that slows small attention 3-4x.

`torch.set_num_threads` also turns MKL's dynamic thread adjustment off and pins the calling thread's MKL thread
count. Kernels that call MKL from inside torch's own parallel loops then run MKL's threading inside every task:
the CPU flash-attention kernel over WinCLIP's windows ([392 windows, 14 heads, 5 tokens, 64]) takes 8-11 ms
instead of 2.5 (`python -m bench.threads`). torch leaves MKL alone when the count is never set, so `use_threads`
sets nothing when the count is already right, and otherwise puts MKL's two settings back after setting it, and
`settle_thread` again on each thread that runs a forward (see there). `single_threaded` gives a pool worker
one thread of its own.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


_count_set = False  # use_threads has called torch.set_num_threads in this process


def use_threads(count: int) -> bool:
    """torch's intra-op threads = ``count`` (0: leave the count as it is: torch's default, one per physical core,
    unless something set one); True if it changed."""
    global _count_set
    if count <= 0 or count == torch.get_num_threads():
        return False
    torch.set_num_threads(count)
    _count_set = True
    restore_mkl_defaults()
    return True


def settle_thread() -> None:
    """Call on the thread about to run a forward. Once a count is set, torch applies it again on every thread's
    first parallel op (as `torch.set_num_threads`), which turns MKL's dynamic threading off for the whole process;
    the daemon loads its model on one thread and scores on another. This runs that first op's set-up now and puts
    MKL back (two cheap calls; nothing at all when no count was ever set)."""
    if _count_set:
        torch.get_num_threads()  # this thread's lazy thread set-up, if it has not run yet
        restore_mkl_defaults()


def single_threaded() -> bool:
    """This thread's torch ops run on this thread alone (OpenMP's thread count is per thread): for pool workers
    whose ops are small and many run at once (the decode pool's resize and normalise). Left at torch's count, each
    worker opens its own team of that many OpenMP threads, and the teams outnumber the cores: 2 workers on 2 cores,
    one of them busy elsewhere, prepared 512-px frames 1.33x slower that way (`python -m bench.decode_pool`).
    False where torch's OpenMP runtime cannot be reached (the count stays torch's)."""
    settle_thread()  # torch's lazy per-thread set-up first (its first parallel op would undo this), MKL put back
    torch.get_num_threads()
    for runtime in _openmp_runtimes():
        runtime.omp_set_num_threads(ctypes.c_int(1))
    return torch.get_num_threads() == 1


def release_team() -> bool:
    """Free the calling thread's OpenMP worker team (OpenMP 5's ``omp_pause_resource_all``, soft): for a thread that
    ran torch's parallel ops and now idles (the model-loading and product-build threads), so the engine thread's
    team is the only one. libgomp counts every team's workers; once they outnumber the cores, every team's workers
    spin 100 times instead of ~300 000 before sleeping on a futex, and each of torch's parallel ops has to wake
    them: one idle 2-thread team beside the engine's took the tiny model from ~110 to 50-85 frames/s on 2 cores
    (0 -> 2-5 ms of kernel time a frame; `python -m bench.openmp`). A later parallel op on this thread makes a new
    team. False where torch's runtime is not a libgomp with the call (other runtimes keep theirs)."""
    freed = False
    for runtime in libgomp_runtimes():
        pause = getattr(runtime, "omp_pause_resource_all", None)
        if pause is not None and pause(ctypes.c_int(1)) == 0:
            freed = True
    return freed


def libgomp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The loaded OpenMP runtimes that are GNU libgomp (PyPI's torch wheels bundle it)."""
    return tuple(r for r in _openmp_runtimes() if "gomp" in os.path.basename(getattr(r, "_name", "") or ""))


def released_team(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` that frees its thread's OpenMP team when it returns or raises (`release_team`): for torch work
    handed to a thread that outlives it."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_team()

    return run


@lru_cache(maxsize=1)
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes already loaded in this process (torch's: PyPI wheels bundle libgomp in torch/lib or
    torch.libs; other builds link libiomp5 or libomp; LD_PRELOAD may have put another one first). Opened with
    RTLD_NOLOAD, so a runtime torch does not use is never loaded as a second one."""
    if not torch.backends.openmp.is_available() or not hasattr(os, "RTLD_NOLOAD"):
        return ()
    site = os.path.dirname(os.path.dirname(torch.__file__))
    paths = [*_mapped_openmp_libraries(), *sorted(glob.glob(os.path.join(site, "torch", "lib", "lib*omp*.so*"))),
             *sorted(glob.glob(os.path.join(site, "torch.libs", "lib*omp*.so*")))]
    found: dict[int, ctypes.CDLL] = {}
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:  # not loaded in this process
            continue
        if hasattr(lib, "omp_set_num_threads"):
            found.setdefault(lib._handle, lib)
    if not found:
        log.debug("torch's OpenMP runtime is not reachable; pool workers keep torch's thread count")
    return tuple(found.values())


def _mapped_openmp_libraries() -> list[str]:
    """Paths of the OpenMP libraries mapped into this process (Linux's /proc/self/maps; empty elsewhere)."""
    try:
        maps = open("/proc/self/maps").read().splitlines()  # noqa: SIM115 - read at once
    except OSError:
        return []
    paths = (line.split(maxsplit=5)[5] for line in maps if line.count(" ") >= 5 and "/" in line)
    return [p for p in dict.fromkeys(paths) if "omp" in os.path.basename(p) and ".so" in p]


def restore_mkl_defaults() -> bool:
    """MKL's dynamic threading on and no per-thread count for the calling thread (MKL's defaults, and torch's until
    `torch.set_num_threads` runs); False where this torch has no MKL whose settings can be reached."""
    mkl = _mkl()
    if mkl is None:
        return False
    mkl.MKL_Set_Dynamic(ctypes.c_int(1))
    mkl.MKL_Set_Num_Threads_Local(ctypes.c_int(0))  # 0: this thread follows the global count again
    return True


@lru_cache(maxsize=1)
def _mkl() -> ctypes.CDLL | None:
    """MKL's service functions: linked into libtorch_cpu in PyPI's wheels, else a shared libmkl_rt in the process."""
    if not torch.backends.mkl.is_available():
        return None
    candidates = [os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), None]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except (OSError, TypeError):  # TypeError: Windows has no CDLL(None)
            continue
        if hasattr(lib, "MKL_Set_Dynamic") and hasattr(lib, "MKL_Set_Num_Threads_Local"):
            return lib
    log.debug("MKL's thread settings are not reachable in this torch build; left as torch set them")
    return None
