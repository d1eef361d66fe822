"""glibc malloc settings for a long-running torch process: memory a batch frees stays in the heap for the next one.

glibc serves a request over its mmap threshold (128 KiB, raised as freed mapped chunks come back, at most 32 MiB)
with a fresh mapping and returns a heap's free top to the kernel once it passes the trim threshold (twice that).
A CPU engine's decode and pre-processing allocate and free buffers of many sizes every frame, so every batch
maps pages anew and takes a page fault for each 4 KiB it touches first: 186 faults and 0.76 ms of kernel time per
tiny-model frame at batch 16, against 1 and 0.05 with this module's settings (`python -m bench.allocator`).
`keep_freed_memory` sets the mmap threshold to glibc's maximum and lets the heap keep up to 1 GiB of free top, so a
steady stream of batches reuses the same pages. The price: resident memory stays at the peak working set, which
is what a daemon must be provisioned for anyway (`allocator: system` in the config keeps glibc's defaults).
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own dynamic threshold on 64-bit; larger requests stay mapped
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # the heap grows in steps this large: fewer brk calls while it reaches its working set
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
CHOICES = ("keep", "system")


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no "this process" library
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Apply `SETTINGS` process-wide (every thread's arena); True when glibc took each of them, False where this
    is not glibc (musl, macOS: nothing changes) or it refused one."""
    libc = _glibc()
    if libc is None:
        log.info("allocator: not glibc; the C library's own malloc settings stay")
        return False
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preloaded:  # jemalloc, tcmalloc, mimalloc: glibc's settings would tune a heap nothing uses
        log.info("allocator: %s is preloaded; it keeps its own settings", preloaded)
        return False
    refused = [param for param, value in SETTINGS if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1]
    if refused:
        log.warning("allocator: glibc refused mallopt(%s); freed memory may go back to the kernel", refused)
    return not refused


def apply(choice: str) -> bool:
    """The config's ``allocator`` choice: "keep" (`keep_freed_memory`) or "system" (nothing is set: glibc's
    defaults, in a process where "keep" was not applied before; settings cannot be taken back); True when the heap
    now keeps freed memory."""
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {list(CHOICES)}, got {choice!r}")
    return keep_freed_memory() if choice == "keep" else False
