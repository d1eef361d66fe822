"""Reference memories and aggregation maths shared by few-shot detectors.

Nearest-neighbour association as batched matrix products (never a Python loop over positions),
and the harmonic averaging that brings window scores onto the patch grid.

On CPU a memory bank is normalised and reordered for oneDNN once, the first time it is searched, and kept
while its tensor lives (`packed_bank`): the similarity GEMM then runs 2-2.5x faster than MKL's on the same
shapes (AMD takes MKL's AVX2 path), and the bank is not normalised again on every frame. The copies together
stay within PACKED_BANKS_BYTES (least recently searched go first; packing again costs about a third of one
search of the bank), so a daemon with many products does not hold every bank twice.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from inspectd.detectors import fused

QUERY_CHUNK = 8192
# On a CPU the queries x bank similarities of one chunk stay within this many floats (16 MB: in cache while their
# max is taken); at 9 440 entries (tiny model, k = 16) 8 192-query chunks wrote 300 MB and read it back: 2.5-3.4x
# slower there, 1.25x at ViT-B's width and k >= 16 (bench/sweeps.py's memory-bank sweep)
CPU_SIMILARITIES = 1 << 22
PACKED_BANKS_BYTES = 1 << 30  # packed copies kept at once (ViT-B, k = 16: ~68 MB a product)

# id(memory) -> (weakref to memory, its version, packed bank, bytes), least recently searched first
_packed: OrderedDict[int, tuple[weakref.ref, int | None, fused.PackedLinear, int]] = OrderedDict()
_packed_lock = threading.Lock()
# (id, weakref) of banks whose tensor is gone, dropped from _packed at once or, when the lock is held (a weakref
# callback runs inside the garbage collector on any thread, also one inside a locked section), at the next one
_gone: deque[tuple[int, weakref.ref]] = deque()


def association_min_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """min over r in memory of 1/2 (1 - <q, r>) for each query [..., D] against memory [M, D].

    Both sides are L2-normalised here. Queries are processed in chunks so the similarity matrix
    stays bounded (chunk x M; on a CPU within CPU_SIMILARITIES floats, or 16 rows of a larger bank).
    """
    shape = queries.shape[:-1]
    flat = F.normalize(queries.reshape(-1, queries.shape[-1]), dim=-1)
    packed = packed_bank(memory) if flat.dtype == torch.float32 and not _wants_grad(flat) else None
    bank = F.normalize(memory, dim=-1) if packed is None else None
    best = torch.empty(flat.shape[0], device=flat.device, dtype=flat.dtype)
    rows = QUERY_CHUNK if flat.device.type != "cpu" else \
        max(16, min(QUERY_CHUNK, CPU_SIMILARITIES // max(1, len(memory))))
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        sims = chunk @ bank.T if packed is None else packed(chunk.contiguous())
        best[start:start + rows] = torch.amax(sims, dim=-1)  # (max(dim).values also finds the indices)
    return (0.5 * (1.0 - best)).reshape(shape)


def packed_bank(memory: torch.Tensor) -> fused.PackedLinear | None:
    """``memory`` [M, D] L2-normalised and reordered for oneDNN's GEMM, made once per tensor (and again if it
    is changed in place); None where the plain product serves: not a CPU fp32 bank, a bank gradients must
    reach, or a torch without oneDNN."""
    if memory.device.type != "cpu" or memory.dtype != torch.float32 or memory.dim() != 2 \
            or _wants_grad(memory) or not fused.available():
        return None
    size = memory.numel() * memory.element_size()
    if size > PACKED_BANKS_BYTES // 2:  # a bank that would crowd out every other keeps the plain product
        return None
    key, version = id(memory), fused.source_version(memory)
    with _packed_lock:
        _drop_gone()
        hit = _packed.get(key)
        if hit is not None and hit[0]() is memory and hit[1] == version:
            _packed.move_to_end(key)
            return hit[2]
    bank = _pack(memory)
    with _packed_lock:
        _drop_gone()
        _packed.pop(key, None)
        while _packed and _bytes() + size > PACKED_BANKS_BYTES:
            _packed.popitem(last=False)
        _packed[key] = (weakref.ref(memory, lambda ref, key=key: _forget(key, ref)), version, bank, size)
    return bank


def _forget(key: int, ref: weakref.ref) -> None:
    """The bank's tensor is gone (a weakref callback: it may run inside the garbage collector on a thread that
    holds _packed_lock already): its packed copy goes now if the lock is free, else at the next locked section."""
    _gone.append((key, ref))
    if _packed_lock.acquire(blocking=False):
        try:
            _drop_gone()
        finally:
            _packed_lock.release()


def packed_bytes() -> int:
    """Bytes the packed copies hold now (the banks' fp32 sizes)."""
    with _packed_lock:
        _drop_gone()
        return _bytes()


def _bytes() -> int:
    return sum(entry[3] for entry in _packed.values())


def _pack(memory: torch.Tensor) -> fused.PackedLinear:
    return fused.PackedLinear.pack(F.normalize(memory.detach(), dim=-1), None, min(QUERY_CHUNK, 1024))


def _drop_gone() -> None:
    """Drop the packed copies of banks whose tensor is gone (unless the id already belongs to a newer entry);
    with _packed_lock held."""
    while _gone:
        key, ref = _gone.popleft()
        hit = _packed.get(key)
        if hit is not None and hit[0] is ref:
            del _packed[key]


def _wants_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def harmonic_window_to_patch(window_scores: torch.Tensor, coverage: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-patch harmonic mean of the scores [N, U] of the windows covering it: [N, L].

    ``coverage`` is the [L, U] 0/1 window-covers-patch matrix; Mbar(p) = N_p / sum_u 1/s_u.
    """
    inverse = 1.0 / window_scores.clamp_min(eps)
    return coverage.sum(dim=1) / (inverse @ coverage.T)


def harmonic_mean(maps: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped score maps."""
    inverse = sum(1.0 / m.clamp_min(eps) for m in maps)
    return len(maps) / inverse
