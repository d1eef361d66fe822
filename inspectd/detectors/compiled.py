"""torch.compile for the image tower's residual blocks (`model.compile`): the modes, the static batch buckets that
bound how many shapes get compiled, and the count of shapes compiled so far.

Each block is compiled with ``dynamic=False``: Inductor's kernels and CUDA graphs ("reduce-overhead",
"max-autotune") need static shapes. The blocks share one compiled graph per input shape (dynamo inlines the
modules and passes their weights as inputs), and `ClipBackbone` pads each batch's rows up to a bucket size
(`bucket`), so a daemon compiles a handful of shapes (buckets x the window sizes) instead of one per batch size.
Padding rows are zeros; rows never see each other in the tower (no batch statistics, self-attention within a
sequence), so the real rows' features are those of the unpadded batch up to the kernels' rounding.

The compiled blocks run the inference forwards only (`ClipBackbone.forward`: the plain tower and WinCLIP's
windows); training forwards (prompted towers) and registered towers keep eager blocks. On a CPU a compiled tower
replaces the oneDNN fused blocks (`fused.py`): it is there to be measured (`python -m bench.run --compile ...`),
the fused blocks stay the default.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the config (which reads MODES) loads without it
    import torch

log = logging.getLogger(__name__)

MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SMALL_BUCKETS = (1, 2, 4, 8)  # then multiples of 8: at most 2x padding below 8 rows, 1.14x (7/8 + 1) above
RECOMPILE_LIMIT = 256  # shapes one block may compile (dynamo's default, 8, is below buckets x window sizes)


def bucket(rows: int) -> int:
    """The padded row count of a batch of ``rows`` tiles: 1, 2, 4, 8, then the next multiple of 8."""
    if rows < 1:
        raise ValueError(f"a batch has at least one row, not {rows}")
    for size in SMALL_BUCKETS:
        if rows <= size:
            return size
    return -(-rows // 8) * 8


def buckets_up_to(rows: int) -> list[int]:
    """Every bucket a batch of 1..``rows`` rows can be padded to (what a warm-up compiles)."""
    return sorted({bucket(n) for n in range(1, rows + 1)})


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended along dim 0 up to ``rows`` (itself when it has that many)."""
    import torch

    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])


class CompiledBlocks:
    """The transformer's blocks, each wrapped by torch.compile in ``mode``; call on [S, L, W] like the blocks.

    `shapes` records every input shape a block has been called with (each a compile the first time, later a cached
    graph): tests and the log count compiles with it."""

    def __init__(self, transformer: torch.nn.Module, mode: str) -> None:
        if mode not in MODES or mode == "off":
            raise ValueError(f"compile mode must be one of {', '.join(MODES[1:])}, not {mode!r}")
        import torch

        self.mode = mode
        self.cuda_graphs = mode in ("reduce-overhead", "max-autotune")
        self.blocks = [torch.compile(block, mode=mode, dynamic=False) for block in transformer.resblocks]
        self.shapes: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()
        self._threads = threading.local()

    def __len__(self) -> int:
        return len(self.blocks)

    def begin_forward(self) -> None:
        """Call before each tower forward: with CUDA graphs, the previous forward's graph outputs may be reused
        from here on (every feature of a forward is copied out of them before the next one: `Features.owned`)."""
        import torch

        if self.cuda_graphs and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        self._note(x)
        return self.blocks[i](x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._note(x)
        for block in self.blocks:
            x = block(x)
        return x

    def _note(self, x: torch.Tensor) -> None:
        if not getattr(self._threads, "limit_raised", False):
            _raise_recompile_limit()
            self._threads.limit_raised = True
        shape = tuple(x.shape)
        if shape in self.shapes:
            return
        with self._lock:
            if shape not in self.shapes:
                self.shapes.add(shape)
                log.info("torch.compile (%s): image tower blocks for input %s (the first batch of this shape waits "
                         "for the compile; %d shapes so far)", self.mode, shape, len(self.shapes))


def _raise_recompile_limit() -> None:
    """dynamo's recompile limit, for the calling thread (dynamo's config is per thread: the engine thread that
    scores does not see a value the loading thread set); raised, never lowered."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT
