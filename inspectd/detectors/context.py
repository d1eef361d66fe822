"""FitContext: what a fit or a training run gets from whoever runs it (seed, progress, stop, checkpoints).

The daemon's registry passes one per product build (progress goes to `GET /products/{id}`, a metric
and the log; a newer update sets the stop flag); `inspectd fit` and `inspectd eval` pass their own.
A fit calls `check_stop()` between steps and `progress(fraction, note)` as it goes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class FitStopped(Exception):  # noqa: N818 - a signal, not an error: the build was superseded or cancelled
    """Raised inside a fit when its context was asked to stop; the caller keeps what it had."""


@dataclass
class FitContext:
    """Seed, progress reporting and cooperative stop for one fit.

    ``on_progress(fraction, note)`` receives fractions in [0, 1] of the whole build; `section` makes a
    child context whose own 0..1 maps onto a slice of its parent's range.
    """

    seed: int = 0
    on_progress: Callable[[float, str], None] | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    checkpoint_dir: Path | None = None  # where a training fit keeps per-epoch checkpoints (resume after a stop)
    _range: tuple[float, float] = (0.0, 1.0)

    def progress(self, fraction: float, note: str = "") -> None:
        low, high = self._range
        if self.on_progress is not None:
            self.on_progress(low + (high - low) * min(1.0, max(0.0, fraction)), note)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise FitStopped("fit stopped")

    def stop(self) -> None:
        self.stop_event.set()

    def section(self, start: float, end: float) -> FitContext:
        """A child context reporting into [start, end] of this one's range (same seed, stop flag, checkpoints)."""
        low, high = self._range
        return FitContext(self.seed, self.on_progress, self.stop_event, self.checkpoint_dir,
                          (low + (high - low) * start, low + (high - low) * end))
