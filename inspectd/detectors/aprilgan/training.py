"""Training APRIL-GAN's stage adapters on a labelled auxiliary dataset (`inspectd fit aprilgan`).

Frozen CLIP; per stage, focal + dice loss of the upsampled two-class map against the ground-truth
mask (official recipe: Adam 1e-3, betas (0.5, 0.999), batch 16; 3 epochs when the targets are
VisA-like, 15 for MVTec). With probability ``mosaic_p`` a sample is a 2 x 2 mosaic of four images of
its category (masks mosaicked the same way). Cross-dataset protocol: train on VisA to test on MVTec
AD and vice versa; the test dataset is never seen. Frozen features of plain (non-mosaic) samples are
cached in memory up to ``feature_cache_mb``, so epochs after the first cost the adapters only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from inspectd.detectors import prompts as P
from inspectd.detectors.aprilgan.adapters import (
    StageAdapters,
    adapters_artifact,
    batched_stage_logits,
    default_image_size,
    default_stages,
    stage_probabilities,
)
from inspectd.detectors.artifacts import Artifact
from inspectd.detectors.backbone import FeatureRequest
from inspectd.detectors.context import FitContext
from inspectd.detectors.data.datasets import load_image, load_mask
from inspectd.detectors.preprocess import InputSpec
from inspectd.detectors.training.loop import LoopConfig, train
from inspectd.detectors.training.losses import dice_loss, focal_loss
from inspectd.detectors.training.trainer import Trainer, TrainingData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AprilGanFitConfig:
    """`inspectd fit aprilgan` flags."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    mosaic_p: float = 0.2
    image_size: int = 0  # 0 = 518 on ViT-L-14-336 (the report), the model's own size elsewhere
    stages: tuple[int, ...] = ()  # 1-based blocks ending each stage; () = 4 equal stages (6/12/18/24 on 24 blocks)
    logit_scale: float = 100.0
    feature_cache_mb: int = 2048  # frozen features kept in RAM across epochs (0 = recompute every epoch)

    help: ClassVar[dict[str, str]] = {
        "epochs": "epochs (report: 3 for VisA-like targets, 15 for MVTec)", "batch_size": "images per step",
        "lr": "Adam learning rate", "seed": "seed of shuffling, mosaics and init",
        "mosaic_p": "probability of a 2x2 same-category mosaic", "image_size": "square input side (0 = default)",
        "stages": "1-based blocks ending each stage, comma separated (default: 4 equal stages)",
        "feature_cache_mb": "RAM for cached frozen features (0 = off)",
    }

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0.0 <= self.mosaic_p <= 1.0:
            raise ValueError(f"mosaic_p must be within [0, 1], got {self.mosaic_p}")
        if any(s < 1 for s in self.stages):
            raise ValueError(f"stages are 1-based block numbers, got {self.stages}")


@dataclass
class Sample:
    image: Path
    mask: Path | None
    category: str


@dataclass
class _Data:
    samples: list[Sample]
    by_category: dict[str, list[int]] = field(default_factory=dict)


def mosaic(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """2 x 2 mosaic of four RGB images and their masks, each cell size/2 (row-major: TL, TR, BL, BR)."""
    if len(images) != 4 or len(masks) != 4:
        raise ValueError("a mosaic takes exactly four images and four masks")
    half = size // 2
    canvas = np.zeros((2 * half, 2 * half, 3), dtype=np.uint8)
    mask_canvas = np.zeros((2 * half, 2 * half), dtype=bool)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        top, left = (i // 2) * half, (i % 2) * half
        canvas[top:top + half, left:left + half] = np.asarray(
            Image.fromarray(image).resize((half, half), Image.Resampling.BICUBIC))
        mask_canvas[top:top + half, left:left + half] = np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).resize((half, half), Image.Resampling.NEAREST)) > 127
    return canvas, mask_canvas


def plan_batches(data: _Data, batch_size: int, mosaic_p: float, generator: torch.Generator
                 ) -> list[list[tuple[int, tuple[int, ...] | None]]]:
    """One epoch: a seeded shuffle of every sample; each becomes, with probability ``mosaic_p``, a mosaic of four
    images drawn from its own category (the sample's slot in the epoch is kept, so epochs have equal length)."""
    n = len(data.samples)
    plan: list[tuple[int, tuple[int, ...] | None]] = []
    for index in torch.randperm(n, generator=generator).tolist():
        members = None
        if torch.rand((), generator=generator).item() < mosaic_p:
            pool = data.by_category[data.samples[index].category]
            members = tuple(pool[p] for p in torch.randint(len(pool), (4,), generator=generator).tolist())
        plan.append((index, members))
    return [plan[i:i + batch_size] for i in range(0, n, batch_size)]


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy((np.asarray(image) > 127).astype(np.float32))  # binarised as the official gt > 0.5


class AprilGanTrainer(Trainer):
    """Trains the stage adapters on the test split (all images, with masks) of an auxiliary dataset."""

    detector = "aprilgan"
    Config = AprilGanFitConfig
    data = "dataset"
    default_model = ("ViT-L-14-336", "openai")  # the report's backbone (run at 518 px)
    description = ("Train APRIL-GAN's per-stage linear adapters on a labelled dataset (frozen CLIP, focal + dice "
                   "on the masks, 2x2 mosaics). Cross-dataset: train on VisA for MVTec AD, on MVTec AD for VisA. "
                   "Products point to the file with `options: {adapters: FILE}`.")

    def __init__(self, backbone: Any, config: AprilGanFitConfig) -> None:
        super().__init__(backbone, config)
        depth = len(backbone.visual.transformer.resblocks)
        self.stages = tuple(s - 1 for s in config.stages) if config.stages else default_stages(depth)
        if max(self.stages) >= depth:
            raise ValueError(f"stages {[s + 1 for s in self.stages]} exceed the tower's {depth} blocks")
        self.image_size = config.image_size or default_image_size(backbone.spec.arch, backbone.image_size)
        # the backbone's: the normalisation its weights were trained with and model.resize, as scoring will use
        self.preprocess = backbone.preprocessor_for(InputSpec(self.image_size, "square"))
        self._cache: dict[int, list[torch.Tensor]] = {}
        self._cache_bytes = 0
        self.forwards = 0  # frozen-backbone forwards (tests count the cache's effect)

    # ------------------------------------------------------------------ data
    def _collect(self, data: TrainingData) -> _Data:
        samples: list[Sample] = []
        for category in data.categories:
            for s in category.test:
                samples.append(Sample(Path(s.image_path), Path(s.mask_path) if s.mask_path else None, category.name))
        if not samples:
            raise ValueError("no labelled images to train on (the dataset's test split is empty)")
        if not any(s.mask is not None for s in samples):
            raise ValueError("no masks in the training data: APRIL-GAN's adapters learn from pixel masks")
        out = _Data(samples)
        for i, s in enumerate(samples):
            out.by_category.setdefault(s.category, []).append(i)
        return out

    def _load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = load_image(sample.image)
        mask = load_mask(sample.mask, image.shape[:2]) if sample.mask else np.zeros(image.shape[:2], dtype=bool)
        return image, mask

    # ------------------------------------------------------------------ features
    def _features(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        pixels = torch.cat([self.preprocess(image)[0] for image in images])
        self.forwards += 1
        feats = self.backbone.forward(pixels, FeatureRequest(blocks=frozenset(self.stages)))
        return [feats.blocks[s].clone() for s in self.stages]

    def _sample_features(self, data: _Data, items: list[tuple[int, tuple[int, ...] | None]]
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage tokens [B, L, W] per stage and masks [B, S, S] for a batch of (index, mosaic members or None)."""
        size = self.image_size
        tokens: list[list[torch.Tensor] | None] = [None] * len(items)
        masks: list[torch.Tensor | None] = [None] * len(items)
        fresh: list[tuple[int, np.ndarray]] = []
        for pos, (index, members) in enumerate(items):
            if members is None and index in self._cache:
                *tokens[pos], masks[pos] = self._cache[index]
                continue
            if members is None:
                image, mask = self._load(data.samples[index])
            else:
                loaded = [self._load(data.samples[m]) for m in members]
                image, mask = mosaic([x[0] for x in loaded], [x[1] for x in loaded], size)
            masks[pos] = resize_mask(mask, size)
            fresh.append((pos, image))
        if fresh:
            stage_tokens = self._features([image for _, image in fresh])
            for j, (pos, _) in enumerate(fresh):
                tokens[pos] = [t[j] for t in stage_tokens]
                index, members = items[pos]
                if members is None:
                    self._remember(index, tokens[pos], masks[pos])
        stacked = [torch.stack([item[s] for item in tokens]) for s in range(len(self.stages))]
        return stacked, torch.stack(masks)

    def _remember(self, index: int, tokens: list[torch.Tensor], mask: torch.Tensor) -> None:
        size = sum(t.numel() * t.element_size() for t in tokens) + mask.numel() * mask.element_size()
        if self._cache_bytes + size <= self.config.feature_cache_mb * (1 << 20):
            # copies: a row of the batch's tensor would keep the whole batch (mosaic rows, rows over the budget)
            # alive, beyond what the budget counts
            self._cache[index] = [*(t.clone() for t in tokens), mask]
            self._cache_bytes += size

    # ------------------------------------------------------------------ training
    def train(self, data: TrainingData, ctx: FitContext, checkpoint: Path | None = None,
              show_progress: bool = True) -> Artifact:
        cfg = self.config
        collected = self._collect(data)
        text = {name: P.text_prototypes(self.backbone, P.APRILGAN_NORMAL_STATES, P.APRILGAN_ANOMALOUS_STATES,
                                        P.APRILGAN_TEMPLATES, name.replace("_", " "))
                for name in collected.by_category}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            adapters = StageAdapters(self.backbone.width, self.backbone.embed_dim, len(self.stages))
        adapters.to(self.backbone.device)
        grid = (self.image_size // self.backbone.patch_size,) * 2
        n = len(collected.samples)
        steps = math.ceil(n / cfg.batch_size)

        def batches(epoch: int, generator: torch.Generator) -> list[list[tuple[int, tuple[int, ...] | None]]]:
            return plan_batches(collected, cfg.batch_size, cfg.mosaic_p, generator)

        def loss_step(batch: list[tuple[int, tuple[int, ...] | None]]) -> torch.Tensor:
            with torch.no_grad():
                tokens, masks = self._sample_features(collected, batch)
            texts = torch.stack([text[collected.samples[i].category] for i, _ in batch])  # [B, 2, D]
            target = masks.to(self.backbone.device)
            loss = torch.zeros((), device=self.backbone.device)
            for adapted in adapters(tokens):
                probs = stage_probabilities(batched_stage_logits(adapted, texts, cfg.logit_scale, grid),
                                            self.image_size)
                loss = loss + focal_loss(probs, target.long()) + dice_loss(probs[:, 1], target)
            return loss

        loop = LoopConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer="adam", betas=(0.5, 0.999), seed=cfg.seed,
                          steps_per_epoch=steps)
        loop_checkpoint = None
        if checkpoint is not None:
            checkpoint.mkdir(parents=True, exist_ok=True)
            loop_checkpoint = checkpoint / "loop.safetensors"
        identity = {"stages": list(self.stages), "image_size": self.image_size, "samples": n,
                    "backbone": self.backbone.identity}
        result = train(adapters, loss_step, batches, loop, progress=ctx,
                       tqdm_desc="train APRIL-GAN adapters" if show_progress else None,
                       checkpoint=loop_checkpoint, identity=identity)
        ctx.check_stop()
        summary = dict(data.summary)
        summary.update({"images": n, "with_masks": sum(1 for s in collected.samples if s.mask is not None),
                        "categories": sorted(collected.by_category)})
        return adapters_artifact(adapters, self.stages, self.image_size, self.backbone.identity,
                                 config={"fit": asdict(cfg), "logit_scale": cfg.logit_scale},
                                 training={"data": summary, "history": result.history,
                                           "resumed_from_epoch": result.resumed_from_epoch})
