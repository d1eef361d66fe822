"""Per-detector rows of the benchmark report: each detector's scoring images/s and executed GFLOP per image at 0-
and k-shot on one shared backbone, its per-product fit time, the training time of its learned part at a short
schedule, and WinCLIP in bf16 (rate and accuracy cost against fp32 on shared MVTec images)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import gpu
from bench.breakdown import breakdown
from bench.common import best_times
from bench.flops import counted_flops
from bench.sweeps import photos
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import Detector, ProductSpec, ProductState, create_detector
from inspectd.detectors.pipeline import ScoreItem, prepare, run

DETECTORS = ("winclip", "randword", "aprilgan", "promptad", "anople")
NEEDS_REFERENCES = {"promptad": "learns its prompts from k >= 1 references"}
GRID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad" / "grid"
MIN_ROUND_S = 1.0  # a cheap setting runs several batches a round, to at least this


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run (quick: minutes on a 2-core CPU)."""

    quick: bool
    shots: tuple[int, ...]
    batch: int  # frames per timed batch
    rounds: int  # timing rounds over every setting (best of: this VM's host only ever slows a round down)
    bf16_rounds: int  # the same for the bf16 rows (2 WinCLIP settings)
    randword_pairs: int  # random-word prompt pairs the FFN is fitted on
    aprilgan_epochs: int
    aprilgan_images: int  # hazelnut_toy images the adapters train on (0 = all 51)
    promptad_steps: int  # prompt steps of a PromptAD product fit
    star_shots: int  # AnoPLe* references (one training step each per epoch)
    star_epochs: int
    star_multi_view: bool  # the paper's 10 views per step, or the full view only (2)
    accuracy_images: int  # MVTec grid test images of the bf16-vs-fp32 comparison

    @classmethod
    def make(cls, quick: bool, device: str = "cpu") -> Plan:
        """On a GPU the timed batches are micro-batches (32 frames, 64 without --quick): what the daemon's batcher
        forms under load, and what keeps the tensor cores busy."""
        if quick:
            return cls(True, (0, 4), batch=32 if gpu.is_cuda(device) else 2, rounds=4, bf16_rounds=5,
                       randword_pairs=64, aprilgan_epochs=2, aprilgan_images=8, promptad_steps=5, star_shots=1,
                       star_epochs=1, star_multi_view=False, accuracy_images=2)
        return cls(False, (0, 1, 4, 16), batch=64 if gpu.is_cuda(device) else 4, rounds=6, bf16_rounds=6,
                   randword_pairs=512, aprilgan_epochs=2, aprilgan_images=0, promptad_steps=20, star_shots=4,
                   star_epochs=1, star_multi_view=True, accuracy_images=6)


def _seconds(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def build(name: str, backbone: ClipBackbone, plan: Plan, tmp: Path) -> tuple[Detector, list[dict[str, Any]]]:
    """The detector, with its learned part made at ``plan``'s short schedule, and rows of what that took."""
    if name == "randword":
        from inspectd.detectors.training.randword_ffn import PromptConfig, TrainConfig, fit_randword_ffn, save_ffn

        train = TrainConfig(pairs=plan.randword_pairs)
        bundle, seconds = _seconds(lambda: fit_randword_ffn(backbone, PromptConfig(), train, progress=False))
        path = save_ffn(bundle, tmp / "randword-ffn.safetensors")
        rows = [{"detector": name, "what": f"FFN fit (offline), {train.pairs} prompt pairs x {train.epochs} epochs "
                 "(the default is 10 000 pairs)", "value": seconds, "unit": "s"}]
        return create_detector(name, backbone, {"ffn": str(path)}), rows
    if name == "aprilgan":
        from bench.aprilgan import bench_train

        rows, path = bench_train(backbone, "bench", plan.aprilgan_epochs, tmp, plan.aprilgan_images)
        images = plan.aprilgan_images or 51
        for row in rows:
            row.update({"detector": name, "what": f"adapter training (offline), {images} hazelnut_toy images, "
                                                  f"batch 16: {row['what']}"})
            row.pop("model", None)
        return create_detector(name, backbone, {"adapters": str(path)}), rows
    if name == "anople":
        from inspectd.detectors.anople.model import AnoPleModel, model_artifact
        from inspectd.detectors.anople.training import Recipe
        from inspectd.detectors.artifacts import save_artifact

        # An untrained (seeded) learned part: the scoring cost is the same, and the CLIP weights are random anyway.
        model = AnoPleModel(backbone, Recipe().architecture(), torch.Generator().manual_seed(0)).to(backbone.device)
        path = tmp / "anople.safetensors"
        save_artifact(model_artifact(model, backbone, {"logit_scale": backbone.logit_scale}, {}), path)
        return create_detector(name, backbone, {"model": str(path)}), star_fit(backbone, plan)
    if name == "promptad":
        return create_detector(name, backbone, {"steps": plan.promptad_steps}), []
    return create_detector(name, backbone), []


def star_fit(backbone: ClipBackbone, plan: Plan) -> list[dict[str, Any]]:
    """AnoPLe*'s per-product fit (its whole learned part trained on the product's references) at a short schedule."""
    views = "10 views" if plan.star_multi_view else "full view only, 2 images"
    detector = create_detector("anople-star", backbone, {"epochs": plan.star_epochs,
                                                          "multi_view": plan.star_multi_view})
    references = photos("good", plan.star_shots)
    state, seconds = _seconds(lambda: detector.fit(ProductSpec("hazelnut", "hazelnut"), references))
    steps = int(state.meta.get("steps_run", plan.star_shots * plan.star_epochs))
    return [{"detector": "anople-star", "what": f"per-product fit, k={plan.star_shots} x {plan.star_epochs} epoch(s) "
             f"= {steps} step(s), {views} per step (the paper: 60 epochs)", "value": seconds, "unit": "s"},
            {"detector": "anople-star", "what": "per-product fit per training step (the paper's schedule: 60 epochs "
             "x k steps)", "value": seconds / max(1, steps), "unit": "s/step"}]


def promptad_fit(backbone: ClipBackbone, plan: Plan, shots: int, fits: list[dict[str, Any]]
                 ) -> tuple[Detector, ProductState, float]:
    """PromptAD's per-product fit through bench/promptad.py (fit time, prompt steps/s, the 100-step extrapolation)."""
    from bench.promptad import bench_fit

    measured, detector, state = bench_fit(backbone, plan.promptad_steps, shots)
    fits += [{"detector": "promptad", **row} for row in measured]
    return detector, state, measured[0]["value"]


def fit_timed(detector: Detector, references: Sequence[np.ndarray]) -> tuple[ProductState, float]:
    return _seconds(lambda: detector.fit(ProductSpec("hazelnut", "hazelnut"), list(references)))


def counted_items(detector: Detector, state: ProductState, frames: Sequence[np.ndarray], device: str,
                  dtype: torch.dtype | None = None, per_op: dict[str, float] | None = None
                  ) -> tuple[list[ScoreItem], float]:
    """(prepared items, FLOPs per image): pre-processing done (not timed), the warm-up batch run under the FLOP
    counter (its FLOPs per op name into ``per_op`` when given); the timed batches include the host-to-device copy
    of their pixels on a GPU, as the daemon's do (`ClipBackbone.batch_pixels`: pinned, non-blocking)."""
    items = [ScoreItem(detector, state, f) for f in frames]
    prepare(items)
    with gpu.autocast(device, dtype):
        flops, by_op = counted_flops(lambda: run(items))
    if per_op is not None:
        per_op.update(by_op)
    return items, flops / len(items)


def time_settings(settings: dict[Any, list[ScoreItem]], device: str, rounds: int, dtype: torch.dtype | None = None,
                  min_round_s: float = MIN_ROUND_S) -> dict[Any, float]:
    """Best seconds per batch of every setting, all timed in turn (`bench.common.best_times`), synchronised on a GPU."""
    sync = gpu.synchronizer(device)

    def batch(items: list[ScoreItem]) -> None:
        run(items)
        sync()

    with gpu.autocast(device, dtype):
        return best_times({key: (lambda items=items: batch(items)) for key, items in settings.items()}, rounds,
                          min_round_s, warmup=0)


def rate_row(name: str, setting: str, seconds: float, batch: int, flops: float, fit_s: float | None
             ) -> dict[str, Any]:
    """A report row: images/s, GFLOP/img and the achieved GFLOP/s (ratios are added by `add_ratios`)."""
    rate = batch / seconds
    return {"detector": name, "setting": setting, "fit_s": fit_s, "images_per_s": rate, "ms_per_image": 1000 / rate,
            "gflop_per_image": flops / 1e9, "gflops": rate * flops / 1e9}


def add_ratios(rows: Sequence[dict[str, Any]], bounds: dict[str, float | None]) -> None:
    """``ratio_NAME`` = achieved GFLOP/s / bound for every bound (None where the bound was not measured)."""
    for row in rows:
        if "gflops" in row:
            for key, bound in bounds.items():
                row[f"ratio_{key}"] = row["gflops"] / bound if bound else None


def detector_rows(backbone: ClipBackbone, names: Sequence[str], plan: Plan, tmp: Path, log: Any = print
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rate rows per detector and setting, fit/training rows) on ``backbone``, frames: 512-px hazelnut photos."""
    device = str(backbone.device)
    dtype = gpu.half_dtype(device)
    frames = photos("colour", plan.batch)
    references = photos("good", max(plan.shots))
    fits: list[dict[str, Any]] = []
    prepared: dict[tuple[str, str], tuple[list[ScoreItem], float, float]] = {}  # items, FLOPs/image, fit s
    order: list[dict[str, Any]] = []
    breakdowns: dict[tuple[str, str], dict[str, Any]] = {}
    for name in names:
        started = time.perf_counter()
        detector, learned = build(name, backbone, plan, tmp)
        fits += learned
        for shots in plan.shots:
            setting = f"{shots}-shot"
            if shots == 0 and name in NEEDS_REFERENCES:
                order.append({"detector": name, "setting": setting, "skipped": NEEDS_REFERENCES[name]})
                continue
            fitted = detector
            if name == "promptad":
                fitted, state, fit_s = promptad_fit(backbone, plan, shots, fits)
            else:
                state, fit_s = fit_timed(detector, references[:shots])
            per_op: dict[str, float] = {}
            items, flops = counted_items(fitted, state, frames, device, dtype, per_op)
            prepared[(name, setting)] = (items, flops, fit_s)
            if not gpu.is_cuda(device):  # CPU ops run on the calling thread: the profiler's self times are wall time
                with gpu.autocast(device, dtype):
                    breakdowns[(name, setting)] = breakdown(lambda items=items: run(items), per_op)
            order.append({"detector": name, "setting": setting})
        log(f"  {name}: built, fitted and counted in {time.perf_counter() - started:.0f} s")
    best = time_settings({key: items for key, (items, _, _) in prepared.items()}, device, plan.rounds, dtype)
    rows = []
    for entry in order:
        key = (entry["detector"], entry["setting"])
        if key not in prepared:
            rows.append(entry)
            continue
        _, flops, fit_s = prepared[key]
        rows.append(rate_row(*key, best[key], plan.batch, flops, fit_s))
        if key in breakdowns:
            rows[-1]["time_by_kind"] = breakdowns[key]
        log(f"  {key[0]} {key[1]}: {rows[-1]['images_per_s']:.2f} images/s, {flops / 1e9:.1f} GFLOP/img")
    return rows, fits


def grid_images(n: int) -> list[np.ndarray]:
    """``n`` MVTec AD grid test images, defective and good alternating where there are both."""
    defective = sorted(p for p in (GRID / "test").glob("*/*.png") if p.parent.name != "good")
    good = sorted((GRID / "test" / "good").glob("*.png"))
    paths = [p for pair in zip(defective, good, strict=False) for p in pair] + defective[len(good):]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths[:n]]


def bf16_section(fp32: ClipBackbone, bf16: ClipBackbone, plan: Plan, fp32_rows: Sequence[dict[str, Any]]
                 ) -> dict[str, Any]:
    """WinCLIP with ``model.precision: bf16``: images/s (ratios to the bf16 peak and GEMM bound: `add_ratios`) and
    the accuracy cost against the fp32 model of the same (seeded) weights on MVTec grid images, 0- and 4-shot."""
    device = str(bf16.device)
    frames = photos("colour", plan.batch)
    detector = create_detector("winclip", bf16)
    prepared = {}
    for shots in (0, 4):
        state, fit_s = fit_timed(detector, photos("good", shots))
        prepared[f"{shots}-shot"] = (*counted_items(detector, state, frames, device), fit_s)
    best = time_settings({key: items for key, (items, _, _) in prepared.items()}, device, plan.bf16_rounds)
    rows = []
    for setting, (_, flops, fit_s) in prepared.items():
        row = rate_row("winclip", setting, best[setting], plan.batch, flops, fit_s)
        same = [r for r in fp32_rows if r.get("detector") == "winclip" and r.get("setting") == setting]
        row["speedup_vs_fp32"] = row["images_per_s"] / same[0]["images_per_s"] if same else None
        rows.append(row)
    images = grid_images(plan.accuracy_images)
    references = [np.asarray(Image.open(p).convert("RGB"))
                  for p in sorted((GRID / "train" / "good").glob("*.png"))[:4]]
    accuracy = []
    for shots in (0, 4):
        outputs = []
        for backbone in (fp32, bf16):
            winclip = create_detector("winclip", backbone)
            state = winclip.fit(ProductSpec("grid", "grid"), references[:shots])
            outputs.append(run([ScoreItem(winclip, state, image) for image in images]))
        ref, low = outputs
        scores = np.array([o.score for o in ref])
        maps = np.stack([o.map for o in ref])
        accuracy.append({
            "setting": f"{shots}-shot", "images": len(images),
            "max_abs_score_diff": max(abs(a.score - b.score) for a, b in zip(ref, low, strict=True)),
            "max_abs_map_diff": max(float(np.abs(a.map - b.map).max()) for a, b in zip(ref, low, strict=True)),
            "fp32_score_range": [float(scores.min()), float(scores.max())],
            "fp32_map_range": [float(maps.min()), float(maps.max())]})
    return {"rows": rows, "accuracy": accuracy}
