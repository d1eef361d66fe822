"""APRIL-GAN on CPU: adapter training time per epoch (first epoch with CLIP features, later epochs from the
feature cache) and scoring images/s at 0 and 4 shots, with the ratio to the GEMM bound measured in this run.

    python -m bench.aprilgan                          # tiny model and ViT-B-16-plus-240 (random weights)
    python -m bench.aprilgan --models tiny --epochs 3
Training data: the real hazelnut_toy images with masks (51 images); scoring: 512-px frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import best_time, fp32_flop_bound, load_model, vit_forward_flops
from inspectd.detectors.artifacts import save_artifact
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.context import FitContext
from inspectd.detectors.data.datasets import open_dataset
from inspectd.detectors.pipeline import ScoreItem, prepare, run
from inspectd.detectors.training.trainer import TrainingData

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy"



def bench_train(backbone: ClipBackbone, name: str, epochs: int, tmp: Path, images: int = 0) -> tuple[list[dict], Path]:
    """Train the adapters on hazelnut_toy (``images`` evenly spaced samples per category, normal and defective;
    0 = all 51): rows of s/epoch (epoch 1, then the mean of the cached epochs) and the saved adapter file."""
    from inspectd.detectors.aprilgan.training import AprilGanFitConfig, AprilGanTrainer

    categories = open_dataset(DATA, "folder")
    if images:
        categories = [dataclasses.replace(c, test=c.test[::max(1, len(c.test) // images)][:images]) for c in categories]
    epoch_times: list[float] = []
    last = [time.perf_counter()]

    def on_progress(fraction: float, note: str) -> None:
        done = round(fraction * epochs, 6)
        if done >= len(epoch_times) + 1:
            now = time.perf_counter()
            epoch_times.append(now - last[0])
            last[0] = now

    trainer = AprilGanTrainer(backbone, AprilGanFitConfig(epochs=epochs, batch_size=16, mosaic_p=0.2))
    last[0] = time.perf_counter()
    artifact = trainer.train(TrainingData(categories=categories), FitContext(on_progress=on_progress), None,
                             show_progress=False)
    path = save_artifact(artifact, tmp / f"{name}-adapters.safetensors") and tmp / f"{name}-adapters.safetensors"
    rows = [{"model": name, "what": "train epoch 1 (CLIP features + adapters)", "value": epoch_times[0],
             "unit": "s/epoch", "images": len(trainer._cache) or sum(len(c.test) for c in categories)}]
    if len(epoch_times) > 1:
        rows.append({"model": name, "what": f"train epochs 2-{epochs} (cached features, 20 % mosaics recomputed)",
                     "value": float(np.mean(epoch_times[1:])), "unit": "s/epoch"})
    return rows, path


def bench_model(name: str, epochs: int, batch: int, tmp: Path) -> list[dict]:
    backbone = load_model(name, tmp)
    rows, path = bench_train(backbone, name, epochs, tmp)
    detector = create_detector("aprilgan", backbone, {"adapters": str(path)})
    frames = [np.asarray(Image.open(p).convert("RGB").resize((512, 512)))
              for p in sorted((DATA / "hazelnut" / "colour").glob("*.png"))[:batch]]
    refs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((DATA / "hazelnut" / "good").glob("*.png"))[:4]]
    bound = fp32_flop_bound(backbone.width)
    grid = detector.input_spec().size // backbone.patch_size
    flops = vit_forward_flops(grid, backbone.patch_size, backbone.width, len(backbone.visual.transformer.resblocks),
                              backbone.embed_dim)
    for shots in (0, 4):
        state = detector.fit(ProductSpec("hazelnut", "hazelnut"), refs[:shots])
        items = [ScoreItem(detector, state, f) for f in frames]
        prepare(items)
        seconds = best_time(lambda items=items: run(items), repeats=3)
        rate = len(frames) / seconds
        rows.append({"model": name, "what": f"score {shots}-shot, batch {batch}", "value": rate, "unit": "images/s",
                     "ratio": rate * flops / 1e9 / bound, "bound": bound})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B-16-plus-240"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print("| model | measure | value | ratio to GEMM bound (GFLOP/s) |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for row in bench_model(name, args.epochs, args.batch, Path(tmp)):
                ratio = f"{row['ratio']:.2f} ({row['bound']:.0f})" if "ratio" in row else ""
                print(f"| {row['model']} | {row['what']} | {row['value']:.2f} {row['unit']} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
