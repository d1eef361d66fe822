"""A test-only detector whose scoring takes ``sleep_s`` seconds (a slow frame in flight at shutdown).

Run a real daemon process with it: ``python -c "import tests.slow_detector; from inspectd.cli import main; ..."``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from inspectd.detectors.base import register_detector
from inspectd.detectors.winclip import WinClip, WinClipOptions


@dataclass(frozen=True)
class SlowOptions(WinClipOptions):
    sleep_s: float = 5.0


@register_detector
class SlowWinClip(WinClip):
    name = "test-slow"
    Options = SlowOptions

    def score(self, features, state):  # noqa: ANN001, ANN201
        time.sleep(self.options.sleep_s)
        return super().score(features, state)
