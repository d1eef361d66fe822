"""torch.compile for the image tower's residual blocks (`model.compile`): the modes, the batch buckets CUDA graphs
are recorded for, and the record of what has been compiled.

The blocks are compiled with the batch (row) dimension dynamic and the sequence length static: one compile per
sequence length (the full pass and each WinCLIP window size) serves every batch size, and the blocks share each
compiled graph (dynamo inlines the modules and passes their weights as inputs). CUDA graphs ("reduce-overhead",
"max-autotune" on a GPU) replay fixed shapes: there `ClipBackbone` pads a batch's rows up to a bucket (`bucket`),
so a bounded set of graphs is recorded. Padding rows are zeros; rows never see each other in the tower (no batch
statistics, attention within a sequence), so the real rows' features are those of the unpadded batch up to rounding.

Only `ClipBackbone`'s own inference forward (the plain tower and WinCLIP's windows) runs the compiled blocks, one
forward at a time (`lock`: a CUDA-graph step must not be cut by another thread's); prompted and registered towers
keep eager blocks. CUDA graphs are recorded per thread (torch's cudagraph trees): a product fit on a build thread
records its own set beside the engine thread's. On a CPU a compiled tower replaces the oneDNN fused blocks
(`fused.py`): slower there (bench/RESULTS.md), it is meant for GPUs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the config (which reads MODES) loads without it
    import torch

log = logging.getLogger(__name__)

MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 64  # graphs per code object (dynamo's default, 8, is below a few models x sequence lengths)


def bucket(rows: int) -> int:
    """The padded row count of a batch of ``rows`` inputs under CUDA graphs: 1, 2, 4, 8, then 12, 16, 24, 32, 48,
    64, ... (every step x1.5 or x1.33: at most half a batch of padding, a log-sized set of graphs)."""
    if rows < 1:
        raise ValueError(f"a batch has at least one row, not {rows}")
    size = 1
    while size < min(rows, 8):
        size *= 2
    while size < rows:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def buckets_up_to(rows: int) -> list[int]:
    """Every bucket a batch of 1..``rows`` rows can be padded to (what a CUDA-graph warm-up records)."""
    out = [1]
    while out[-1] < rows:
        out.append(bucket(out[-1] + 1))
    return out


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended along dim 0 up to ``rows`` (itself when it has that many)."""
    import torch

    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])


class CompiledBlocks:
    """The transformer's blocks, each wrapped by torch.compile in ``mode``; call on [S, L, W] like the blocks.

    `shapes` records every [rows, length, width] the blocks have run (tests and the log read it); `cuda_graphs`
    says whether batches must be padded to a bucket."""

    def __init__(self, transformer: torch.nn.Module, mode: str, device: torch.device) -> None:
        import torch  # (the mode was validated with the ModelSpec: ClipBackbone)

        self.mode = mode
        self.cuda_graphs = mode in CUDA_GRAPH_MODES and device.type == "cuda"
        self.blocks = [torch.compile(block, mode=mode, dynamic=None) for block in transformer.resblocks]
        self.shapes: set[tuple[int, ...]] = set()
        self.lock = threading.RLock()  # one compiled forward at a time (see begin_forward)

    def __len__(self) -> int:
        return len(self.blocks)

    def begin_forward(self) -> None:
        """Call, holding `lock`, before each pass over the blocks: under CUDA graphs the previous pass's graph
        outputs may be overwritten from here on (the caller has copied out what it keeps). The step counter is
        process-wide, so a pass of another thread in between would cut this one: hence the lock."""
        import torch

        if self.cuda_graphs and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.blocks[i:i + 1], x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.blocks, x)

    def _run(self, blocks: list, x: torch.Tensor) -> torch.Tensor:
        from torch._dynamo.utils import counters

        self._prepare(x)
        shape, graphs, started = tuple(x.shape), counters["stats"]["unique_graphs"], time.perf_counter()
        for block in blocks:
            x = block(x)
        if counters["stats"]["unique_graphs"] > graphs:  # this call compiled: say so (the batch waited for it)
            log.info("torch.compile (%s): compiled the image tower's blocks for input %s in %.1f s", self.mode,
                     shape, time.perf_counter() - started)
        return x

    def _prepare(self, x: torch.Tensor) -> None:
        import torch
        import torch._dynamo.config as dynamo_config

        # dynamo's config lives in context variables: a value set on another thread (or in a copied context, as
        # asyncio.to_thread's) is not seen here, so it is checked on every call; raised, never lowered
        if dynamo_config.recompile_limit < RECOMPILE_LIMIT:
            dynamo_config.recompile_limit = RECOMPILE_LIMIT
        if not self.cuda_graphs and x.shape[0] > 1:  # 1 stays static: dynamo specialises it anyway
            torch._dynamo.maybe_mark_dynamic(x, 0)
        shape = tuple(x.shape)
        if shape not in self.shapes:
            self.shapes.add(shape)
            log.debug("torch.compile (%s): image tower blocks ran %s (%d shapes so far)", self.mode, shape,
                      len(self.shapes))
