"""Reference memories and aggregation maths shared by few-shot detectors.

Nearest-neighbour association as batched matrix products (never a Python loop over positions),
and the harmonic averaging that brings window scores onto the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

QUERY_CHUNK = 8192


def association_min_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """min over r in memory of 1/2 (1 - <q, r>) for each query [..., D] against memory [M, D].

    Both sides are L2-normalised here. Queries are processed in chunks so the similarity matrix
    stays bounded (chunk x M).
    """
    shape = queries.shape[:-1]
    flat = F.normalize(queries.reshape(-1, queries.shape[-1]), dim=-1)
    bank = F.normalize(memory, dim=-1)
    best = torch.empty(flat.shape[0], device=flat.device, dtype=flat.dtype)
    for start in range(0, flat.shape[0], QUERY_CHUNK):
        sims = flat[start:start + QUERY_CHUNK] @ bank.T
        best[start:start + QUERY_CHUNK] = sims.max(dim=-1).values
    return (0.5 * (1.0 - best)).reshape(shape)


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
