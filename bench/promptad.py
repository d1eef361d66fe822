"""PromptAD on CPU: per-product fit time (k references through the V-V tower, then the prompt steps) and
scoring images/s of the V-V tower + prompts + memory, beside the plain tower's forward for reference.

    python -m bench.promptad                                  # tiny model and ViT-B-16-plus-240 (random weights)
    python -m bench.promptad --models ViT-B-16-plus-240 --steps 10    # fewer steps; the default is 100
The fit's steps/s is measured over the steps run; "fit, extrapolated" scales it to the default 100 steps.
Fit data: k hazelnut_toy good images; scoring: 512-px colour-defect frames.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import load_model, scoring_rows
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.context import FitContext
from inspectd.detectors.pipeline import ScoreItem

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"
DEFAULT_STEPS = 100



def images(folder: str, n: int, size: int | None = None) -> list[np.ndarray]:
    paths = sorted((DATA / folder).glob("*.png"))[:n]
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size)) if size else Image.open(p).convert("RGB"))
            for p in paths]


def bench_fit(backbone: ClipBackbone, steps: int, shots: int) -> tuple[list[dict], object, object]:
    detector = create_detector("promptad", backbone, {"steps": steps})
    marks: list[float] = []
    ctx = FitContext(on_progress=lambda fraction, note: marks.append(time.perf_counter()) if "step" in note else None)
    started = time.perf_counter()
    state = detector.fit(ProductSpec("hazelnut", "hazelnut"), images("good", shots), ctx)
    total = time.perf_counter() - started
    train_s = marks[-1] - marks[0] if len(marks) > 1 else total
    per_step = train_s / max(1, len(marks) - 1)
    setup = total - per_step * steps
    rows = [{"what": f"fit k={shots}, {steps} steps (measured)", "value": total, "unit": "s"},
            {"what": "prompt steps/s (2 sets, text tower fwd+bwd)", "value": 1.0 / per_step, "unit": "steps/s"},
            {"what": f"fit k={shots}, {DEFAULT_STEPS} steps (extrapolated: setup + {DEFAULT_STEPS} x step)",
             "value": setup + per_step * DEFAULT_STEPS, "unit": "s"}]
    return rows, detector, state


def bench_model(name: str, steps: int, shots: int, batch: int, tmp: Path) -> list[dict]:
    backbone = load_model(name, tmp)
    rows, detector, state = bench_fit(backbone, steps, shots)
    frames = images("colour", batch, 512)
    items = [ScoreItem(detector, state, f) for f in frames]
    rows += scoring_rows(backbone, items, shots, "V-V tower + memory")
    return [{"model": name, **row} for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B-16-plus-240"])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="prompt steps of the measured fit")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print("| model | measure | value |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for row in bench_model(name, args.steps, args.shots, args.batch, Path(tmp)):
                print(f"| {row['model']} | {row['what']} | {row['value']:.2f} {row['unit']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
