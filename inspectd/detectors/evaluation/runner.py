"""Offline evaluation: the papers' k-shot protocol over a dataset, through the daemon's own scoring code.

For every shots value k and seed: per category, sample k references from the normal training pool,
build the product exactly as the daemon does (`building.build_product`: fit + calibrate, through the
same state cache), score the test images with `pipeline.run` (the same mixed-batch code the daemon's
engine runs), and stream scores and maps into per-category metric accumulators. With `calibrate`,
verdict precision, recall and F1 at the calibrated threshold are reported next to the threshold-free
metrics. Scores, maps and built states are cached on disk, so re-running (another metric, an
interrupted run) does not recompute CLIP.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, ProductState, create_detector
from inspectd.detectors.building import BuildResult, StateCache, ThresholdPolicy, build_fingerprint, build_product
from inspectd.detectors.context import FitContext
from inspectd.detectors.data.datasets import (
    Category,
    Sample,
    load_image,
    load_image_scaled,
    load_mask,
    sample_references,
)
from inspectd.detectors.evaluation.cache import ScoreCache, image_fingerprint
from inspectd.detectors.evaluation.metrics import CategoryEvaluator
from inspectd.detectors.evaluation.tables import ResultTable, summarize, vand_hmean
from inspectd.detectors.pipeline import ScoreItem, run

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What to evaluate and how."""

    detector: str = "winclip"
    options: dict[str, Any] = field(default_factory=dict)
    shots: Sequence[int] = (0,)
    seeds: int = 1
    eval_size: int = 256  # maps and masks are compared at eval_size x eval_size (masks: nearest)
    batch_size: int = 8
    dataset_name: str = "dataset"
    object_names: dict[str, str] = field(default_factory=dict)  # category -> prompt object name
    defect_words: dict[str, list[str]] = field(default_factory=dict)
    cache_dir: str | None = None
    calibrate: bool = False  # report verdict precision/recall/F1 at the threshold a deployment would get
    vand: bool = False  # add the VAND 2023 per-category score (harmonic mean of image and pixel F1-max)
    mask_threshold: int = 127  # 8-bit mask values above it are anomalous (0/1 masks: above 0)
    threshold: ThresholdPolicy = field(default_factory=ThresholdPolicy)


def object_name(category: str, settings: EvalSettings) -> str:
    return settings.object_names.get(category, category.replace("_", " "))


def seeds_for(shots: int, seeds: int) -> list[int]:
    """Zero-shot has no randomness: one run. Few-shot: seeds 0..n-1."""
    return [0] if shots == 0 else list(range(seeds))


def evaluate(backbone: ClipBackbone, categories: Sequence[Category], settings: EvalSettings,
             progress: Callable[[int, str], None] | None = None,
             on_table: Callable[[int, ResultTable], None] | None = None) -> dict[int, ResultTable]:
    """{shots: ResultTable (mean ± std over seeds, per category and mean row)}.

    ``on_table(shots, table)`` is called as each shots value finishes (the CLI writes its files then), so a
    later failure never loses finished results; a (category, shots, seed) cell that cannot run (too few
    training images, a failure) is skipped with a note instead of ending the run.
    """
    run_ = _Run(backbone, settings, progress)
    tables: dict[int, ResultTable] = {}
    for shots in settings.shots:
        per_seed: list[dict[str, dict[str, float]]] = []
        notes: list[str] = []
        for seed in seeds_for(shots, settings.seeds):
            results: dict[str, dict[str, float]] = {}
            for category in categories:
                if shots > len(category.train):
                    notes.append(f"{category.name}: {shots}-shot skipped: {len(category.train)} normal training "
                                 "image(s)")
                    continue
                try:
                    results[category.name], category_notes = run_.category(category, shots, seed)
                except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others
                    log.exception("%s %d-shot seed %d failed", category.name, shots, seed)
                    notes.append(f"{category.name}: {shots}-shot seed {seed} failed: {type(exc).__name__}: {exc}")
                    continue
                if seed == 0:
                    notes += category_notes + list(category.notes)
            if results:
                per_seed.append(results)
        if not per_seed:
            log.warning("%d-shot: no category could be evaluated (%s)", shots, "; ".join(notes))
            continue
        seeds = seeds_for(shots, settings.seeds)
        title = f"{settings.detector} {shots}-shot on {settings.dataset_name} ({len(seeds)} seed(s))"
        if backbone.demo_weights:
            title += " — RANDOM WEIGHTS: MEANINGLESS"
        tables[shots] = summarize(per_seed, title=title, notes=list(dict.fromkeys(notes + run_.skipped_notes())))
        if on_table is not None:
            on_table(shots, tables[shots])
    if run_.cache is not None:
        log.info("score cache: %d hit(s), %d miss(es)", run_.cache.hits, run_.cache.misses)
    return tables


class _Run:
    """One evaluation's detector, cache and progress; scores one (category, shots, seed) at a time."""

    def __init__(self, backbone: ClipBackbone, settings: EvalSettings,
                 progress: Callable[[int, str], None] | None) -> None:
        self.backbone = backbone
        self.settings = settings
        self.progress = progress
        self.detector = create_detector(settings.detector, backbone, settings.options)
        self.detector.load_learned()  # before the fingerprint: the parts scored are the ones it names
        self.fingerprint = self.detector.config_fingerprint()
        if self.detector.preprocessor.resize == "fast":  # test JPEGs decoded smaller since: their scores changed
            self.fingerprint += "-jpeg-draft"  # (the products' states did not: references are decoded in full)
        self.cache = ScoreCache(settings.cache_dir) if settings.cache_dir else None
        self.states = StateCache(Path(settings.cache_dir) / "states") if settings.cache_dir else None
        self.builds = 0  # products built (not loaded from the state cache), for tests
        self.unreadable: dict[str, list[str]] = {}  # category -> test images that could not be decoded
        self.mask_mismatch: dict[str, list[str]] = {}  # category -> masks of another size than their image

    def skipped_notes(self) -> list[str]:
        notes = [f"{c}: {len(set(files))} unreadable test image(s) skipped: {', '.join(sorted(set(files))[:10])}"
                 for c, files in self.unreadable.items()]
        notes += [f"{c}: {len(set(files))} mask(s) of another size than their image, resized (nearest): "
                  f"{', '.join(sorted(set(files))[:10])}" for c, files in self.mask_mismatch.items()]
        return notes

    def _load(self, category: Category, sample: Sample) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(pixels, the image's own size), decoded as the daemon decodes its frames (smaller, for a JPEG under
        model.resize: fast), or None when unreadable."""
        try:
            return load_image_scaled(sample.image_path, self.detector.preprocessor.decode_size)
        except Exception as exc:  # noqa: BLE001 - a truncated or damaged file: skipped and named
            log.warning("%s: cannot read %s (%s: %s); skipped", category.name, sample.image_path,
                        type(exc).__name__, exc)
            self.unreadable.setdefault(category.name, []).append(Path(sample.image_path).name)
            return None

    def _item(self, state: ProductState, image: np.ndarray, original: tuple[int, int], map_size: tuple[int, int]
              ) -> ScoreItem:
        tiles, layout = self.detector.preprocessor(image, original=original)
        return ScoreItem(self.detector, state, tiles=tiles, layout=layout, map_size=map_size)

    def build(self, category: Category, spec: ProductSpec, refs: Sequence[Sample], seed: int) -> BuildResult:
        """The product as the daemon would build it from these references (through the state cache), a training
        detector trained with ``seed`` as the daemon trains a product with its ``seed``."""
        policy = self.settings.threshold
        files = [Path(r.image_path) for r in refs]
        fingerprint = build_fingerprint(self.detector, spec, policy, files,
                                        extra={"eval": category.name, "seed": seed})
        found = self.states.load(self.detector, spec.product, fingerprint) if self.states else None
        if found is not None:
            return found
        if not self.settings.calibrate:  # scores only: skip the calibration fits
            policy = ThresholdPolicy(value=policy.default)
        result = build_product(self.detector, spec, [load_image(r.image_path) for r in refs], (), policy,
                               FitContext(seed=seed))
        result.fingerprint = fingerprint
        self.builds += 1
        if self.states:
            self.states.store(self.detector, spec.product, result)
        return result

    def category(self, category: Category, shots: int, seed: int) -> tuple[dict[str, float], list[str]]:
        settings = self.settings
        if shots > len(category.train):
            raise ValueError(f"{category.name}: {shots}-shot needs {shots} normal training images, "
                             f"has {len(category.train)}")
        refs = sample_references(category.train, shots, seed)
        refs_id = hashlib.sha256("\n".join(image_fingerprint(r.image_path) for r in refs).encode()).hexdigest()[:16]
        spec = ProductSpec(category.name, object_name(category.name, settings),
                           tuple(settings.defect_words.get(category.name, ())))
        evaluator = CategoryEvaluator(category.name, has_masks=category.has_masks and self.detector.produces_masks)
        tests = category.test_samples(exclude=refs)
        label = f"{settings.detector} {shots}-shot seed {seed} {category.name}"
        built = self.build(category, spec, refs, seed) if settings.calibrate else None
        verdicts: list[tuple[float, int]] = []
        for start in range(0, len(tests), settings.batch_size):
            batch = tests[start:start + settings.batch_size]
            keys = [self._key(s, shots, seed, refs_id) for s in batch]
            outputs = [self.cache.get(k) if self.cache is not None and k else None for k in keys]
            missing = [i for i, out in enumerate(outputs) if out is None]
            if missing:
                if built is None:  # built lazily: a fully cached category needs no CLIP at all
                    built = self.build(category, spec, refs, seed)
                size = (settings.eval_size, settings.eval_size)
                images = {i: self._load(category, batch[i]) for i in missing}
                readable = [i for i in missing if images[i] is not None]
                fresh = run([self._item(built.state, *images[i], size) for i in readable])
                for i, out in zip(readable, fresh, strict=True):
                    outputs[i] = (out.score, out.map)
                    if self.cache is not None and keys[i]:
                        self.cache.put(keys[i], out.score, out.map)
            for sample, output in zip(batch, outputs, strict=True):
                if output is None:  # unreadable: skipped, named in the notes
                    continue
                score, amap = output
                mask = None
                if evaluator.pixel is not None and sample.mask_path is not None:
                    raw_mask = load_mask(sample.mask_path, threshold=settings.mask_threshold)
                    self._check_mask_size(category, sample, raw_mask.shape)
                    mask = resize_mask(raw_mask, settings.eval_size)
                evaluator.update(score, sample.label, amap if evaluator.pixel is not None else None, mask)
                verdicts.append((score, int(sample.label)))
            if self.progress:
                self.progress(len(batch), label)
        metrics, notes = evaluator.compute()
        if settings.vand:
            metrics = dict(metrics, vand_hmean=vand_hmean(metrics.get("image_f1_max", float("nan")),
                                                          metrics.get("pixel_f1_max", float("nan"))))
        if settings.calibrate and built is not None:
            metrics = dict(metrics, **verdict_metrics(verdicts, built.threshold))
            notes = [*notes, f"{category.name} {shots}-shot seed {seed}: NG verdicts at the calibrated threshold "
                             f"{built.threshold:.4f} ({describe_calibration(built.calibration)})"]
        return metrics, notes

    def _check_mask_size(self, category: Category, sample: Sample, shape: tuple[int, ...]) -> None:
        with Image.open(sample.image_path) as im:
            size = (im.size[1], im.size[0])
        if tuple(shape) != size:
            name = Path(sample.mask_path).name
            if name not in self.mask_mismatch.get(category.name, []):
                log.warning("%s: mask %s is %s but its image is %s; resized", category.name, sample.mask_path,
                            tuple(shape), size)
            self.mask_mismatch.setdefault(category.name, []).append(name)

    def _key(self, sample: Sample, shots: int, seed: int, refs: str) -> Any:
        """A cached score depends on the detector's config, the map size and the reference images' files too."""
        if self.cache is None:
            return None
        return self.cache.key(model_id=self.backbone.model_id, dataset=self.settings.dataset_name,
                              image_path=sample.image_path, detector=self.settings.detector,
                              config_hash=f"{self.fingerprint}|map{self.settings.eval_size}|refs:{refs}",
                              shots=shots, seed=seed)


def verdict_metrics(scored: Sequence[tuple[float, int]], threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of the NG verdict (score >= threshold) against the labels (1 = defective)."""
    tp = sum(1 for s, y in scored if s >= threshold and y == 1)
    fp = sum(1 for s, y in scored if s >= threshold and y == 0)
    fn = sum(1 for s, y in scored if s < threshold and y == 1)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if tp + fp + fn else float("nan"))
    return {"verdict_precision": precision, "verdict_recall": recall, "verdict_f1": f1}


def describe_calibration(record: dict[str, Any]) -> str:
    if record.get("method") != "quantile":
        return str(record.get("method", "?")) + (f": {record['reason']}" if record.get("reason") else "")
    sources = ", ".join(f"{record[k]} {k.replace('_', ' ')}" for k in ("leave_one_out", "shifted_views", "holdout")
                        if record.get(k))
    return f"quantile {record['quantile']} of {record['normals']} normal scores ({sources}) + margin {record['margin']}"


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def total_images(categories: Sequence[Category], settings: EvalSettings) -> int:
    """Test images the run will score (references drawn from the test pool, as in the folder layout, excluded)."""
    total = 0
    for k in settings.shots:
        for seed in seeds_for(k, settings.seeds):
            for c in categories:
                if k <= len(c.train):
                    total += len(c.test_samples(exclude=sample_references(c.train, k, seed)))
    return total


def output_paths(out_dir: str | Path, detector: str, shots: int) -> tuple[Path, Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{detector}_{shots}shot"
    return out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.csv"
