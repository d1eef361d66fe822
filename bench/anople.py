"""AnoPLe on CPU: training steps/s and fit time of the multi-class model (and AnoPLe*), and scoring images/s of the
prompted tower + decoder + memory, beside the plain tower's forward for reference.

    python -m bench.anople                                     # tiny model and ViT-B-16-plus-240 (random weights)
    python -m bench.anople --models ViT-B-16-plus-240 --epochs 1 --views full
A training step is one image: 10 views (5 normal + 5 pseudo-abnormal) through the prompted tower with gradients
(``--views full``: the full view only, 2 images). Steps/s is measured over the steps run (the first step, which
builds caches, excluded); the "extrapolated" rows scale it to the paper's 60 epochs: MVTec AD 1-shot multi-class
(15 classes x 1 image = 900 steps) and AnoPLe* with k = 4 (240 steps per product).
Fit data: 1 good image each of hazelnut_toy, MVTec grid and bottle; scoring: 512-px hazelnut colour-defect frames.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import load_model, scoring_rows
from inspectd.detectors.anople.model import model_artifact
from inspectd.detectors.anople.training import Recipe, fit_model
from inspectd.detectors.artifacts import save_artifact
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.context import FitContext
from inspectd.detectors.pipeline import ScoreItem

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAZELNUT = DATA / "hazelnut_toy" / "hazelnut"
CLASSES = {"hazelnut": HAZELNUT / "good", "grid": DATA / "mvtec_ad" / "grid" / "train" / "good",
           "bottle": DATA / "mvtec_ad" / "bottle" / "test" / "good"}
PAPER_EPOCHS = 60



def images(folder: Path, n: int, size: int | None = None) -> list[np.ndarray]:
    paths = sorted(folder.glob("*.png"))[:n]
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size)) if size else Image.open(p).convert("RGB"))
            for p in paths]


def bench_fit(backbone: ClipBackbone, recipe: Recipe, label: str) -> tuple[list[dict], object]:
    named = [(name, image) for name, folder in CLASSES.items() for image in images(folder, 1)]
    marks: list[float] = []
    ctx = FitContext(on_progress=lambda fraction, note: marks.append(time.perf_counter()) if "step" in note else None)
    started = time.perf_counter()
    model, result = fit_model(backbone, named, recipe, seed=0, progress=ctx)
    total = time.perf_counter() - started
    steps = sum(int(r["steps"]) for r in result.history)
    per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else total / steps
    rows = [{"what": f"multi-class fit, {len(named)} images x {recipe.epochs} epoch(s) = {steps} steps ({label}, "
                     "measured)", "value": total, "unit": "s"},
            {"what": f"training steps/s ({label})", "value": 1.0 / per_step, "unit": "steps/s"},
            {"what": f"MVTec 1-shot multi-class, {PAPER_EPOCHS} epochs = 900 steps (extrapolated)",
             "value": 900 * per_step, "unit": "s"},
            {"what": f"AnoPLe* k=4, {PAPER_EPOCHS} epochs = 240 steps per product (extrapolated)",
             "value": 240 * per_step, "unit": "s"}]
    return rows, model


def bench_model(name: str, recipe: Recipe, label: str, shots: int, batch: int, tmp: Path) -> list[dict]:
    backbone = load_model(name, tmp)
    rows, model = bench_fit(backbone, recipe, label)
    path = tmp / f"{name}-anople.safetensors"
    save_artifact(model_artifact(model, backbone, {"logit_scale": backbone.logit_scale}, {}), path)
    detector = create_detector("anople", backbone, {"model": str(path)})
    started = time.perf_counter()
    state = detector.fit(ProductSpec("hazelnut", "hazelnut"), images(HAZELNUT / "good", shots))
    rows.append({"what": f"product fit k={shots} (prototypes + memory)", "value": time.perf_counter() - started,
                 "unit": "s"})
    items = [ScoreItem(detector, state, f) for f in images(HAZELNUT / "colour", batch, 512)]
    rows += scoring_rows(backbone, items, shots, "prompted tower + decoder + memory")
    return [{"model": name, **row} for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B-16-plus-240"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the measured fit (3 images each)")
    parser.add_argument("--views", choices=("multi", "full"), default="multi",
                        help="multi: the paper's 5 views per image; full: the full view only")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    recipe = Recipe(epochs=args.epochs, multi_view=args.views == "multi")
    label = "10 views/step" if recipe.multi_view else "2 views/step"
    print("| model | measure | value |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for row in bench_model(name, recipe, label, args.shots, args.batch, Path(tmp)):
                print(f"| {row['model']} | {row['what']} | {row['value']:.2f} {row['unit']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
