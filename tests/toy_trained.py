"""A test detector with trainable parts: "toy-trained" proves the learning machinery end to end.

Offline part (`ToyTrainer`, `inspectd fit toy-trained`): a linear head on CLIP image embeddings, trained on a
dataset's categories (normal vs. defective images) through the shared loop, saved as a learned-part artifact.
Per-product part (`ToyTrained.fit`): a normal prototype in the head's output space, trained from the product's
references through the same loop, with the build's FitContext as progress sink and its checkpoint dir (stop,
resume). Score (image level): 1/2 (1 - cos(head(e), prototype)).

Import this module (as ``tests.toy_trained``) to register the detector in-process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.detectors import artifacts
from inspectd.detectors.backbone import FeatureRequest, Features
from inspectd.detectors.base import (
    Detector,
    DetectorOutput,
    Learning,
    ProductSpec,
    ProductState,
    register_detector,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.pipeline import score_images
from inspectd.detectors.preprocess import InputSpec
from inspectd.detectors.training.loop import LoopConfig, train
from inspectd.detectors.training.trainer import Trainer, TrainingData

NAME = "toy-trained"
VERSION = 1
REFIT_HINT = f"re-run `inspectd fit {NAME} --out FILE` with this backbone"

# Test hook: raise KeyboardInterrupt (a Ctrl-C) when the offline loop asks for this epoch's batches, so a test can
# interrupt `inspectd fit` after a checkpoint was written and show the next run resumes. None = never.
INTERRUPT_AT_EPOCH: int | None = None


def image_embeddings(backbone: Any, images: Sequence[np.ndarray], chunk: int = 16) -> torch.Tensor:
    """L2-normalised CLS embeddings [N, D] (fp32, CPU) of whole frames (one square input each)."""
    preprocess = backbone.preprocessor_for(InputSpec(backbone.image_size, "square"))
    out = []
    for start in range(0, len(images), chunk):
        tiles = torch.cat([preprocess(image)[0] for image in images[start:start + chunk]])
        out.append(backbone.forward(tiles, FeatureRequest()).image_embeddings.float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


class Head(nn.Module):
    """D -> D linear map, initialised to the identity (an untrained head changes nothing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


# ---------------------------------------------------------------------------------------------- offline part
@dataclass(frozen=True)
class ToyConfig:
    """`inspectd fit toy-trained` flags."""

    epochs: int = 2
    lr: float = 0.01
    seed: int = 0
    batch_size: int = 8
    max_images: int = 12  # per class (normal / defective), to keep the test quick

    help: ClassVar[dict[str, str]] = {"epochs": "training epochs", "lr": "Adam learning rate",
                                      "max_images": "images per class used"}

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.max_images < 1:
            raise ValueError(f"toy-trained: epochs >= 1, batch_size >= 2, max_images >= 1 needed, got {self}")


class ToyTrainer(Trainer):
    """Trains the head: normal embeddings pulled onto their batch centre, defective ones pushed off it."""

    detector = NAME
    Config = ToyConfig
    data = "dataset"
    description = "Train toy-trained's linear head on a dataset's normal and defective images (tests only)."

    def train(self, data: TrainingData, ctx: FitContext, checkpoint: Path | None = None,
              show_progress: bool = True) -> artifacts.Artifact:
        from inspectd.detectors.data.datasets import load_image

        cfg: ToyConfig = self.config
        normals = [s.image_path for c in data.categories for s in c.train][:cfg.max_images]
        defective = [s.image_path for c in data.categories for s in c.test if s.label == 1][:cfg.max_images]
        if not normals or not defective:
            raise ValueError(f"toy-trained needs normal and defective images, got {len(normals)} and {len(defective)}")
        paths = normals + defective
        x = image_embeddings(self.backbone, [load_image(p) for p in paths])
        ctx.progress(0.2, "embedded")
        y = torch.tensor([0.0] * len(normals) + [1.0] * len(defective))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = Head(x.shape[1])

        def loss_step(rows: torch.Tensor) -> torch.Tensor:
            z, labels = head(x[rows]), y[rows]
            normal = labels == 0
            centre = F.normalize(z[normal].mean(0) if normal.any() else z.mean(0).detach(), dim=-1)
            cos = z @ centre
            pull = (1 - cos[normal]).mean() if normal.any() else cos.sum() * 0
            push = F.relu(cos[~normal] - 0.5).mean() if (~normal).any() else cos.sum() * 0
            return pull + push

        def batches(epoch: int, generator: torch.Generator) -> list[torch.Tensor]:
            if INTERRUPT_AT_EPOCH is not None and epoch == INTERRUPT_AT_EPOCH:
                raise KeyboardInterrupt(f"test interrupt before epoch {epoch}")
            return list(torch.randperm(len(paths), generator=generator).split(cfg.batch_size))

        loop_checkpoint = None
        if checkpoint is not None:
            checkpoint.mkdir(parents=True, exist_ok=True)
            loop_checkpoint = checkpoint / "loop.safetensors"
        result = train(head, loss_step, batches, LoopConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer="adam",
                                                             seed=cfg.seed),
                       progress=ctx.section(0.2, 1.0), tqdm_desc="train head" if show_progress else None,
                       checkpoint=loop_checkpoint, identity={"images": [p.name for p in paths], "dim": x.shape[1]})
        if result.stopped:
            ctx.check_stop()
        return artifacts.Artifact(
            kind=artifacts.LEARNED, detector=NAME, detector_version=VERSION,
            tensors={k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
            backbone=dict(self.backbone.identity), config={"train": {"epochs": cfg.epochs, "lr": cfg.lr,
                                                                      "seed": cfg.seed, "batch_size": cfg.batch_size}},
            training={"history": result.history, "resumed_from_epoch": result.resumed_from_epoch,
                      "data": {**data.summary, "normals": len(normals), "defective": len(defective)}})


# ---------------------------------------------------------------------------------------------- the detector
@dataclass(frozen=True)
class ToyOptions:
    head: str = ""  # learned-part file from `inspectd fit toy-trained` (empty: the identity head)
    epochs: int = 3  # per-product training epochs
    steps: int = 4  # optimiser steps per epoch
    lr: float = 0.05
    seed: int = 0
    noise: float = 0.05  # gaussian noise on the reference embeddings per step
    step_sleep_s: float = 0.0  # sleep in every step (tests: a build slow enough to watch and stop)


@register_detector
class ToyTrained(Detector):
    """score = 1/2 (1 - cos(head(e), prototype)); image level only."""

    name = NAME
    version = VERSION
    Options = ToyOptions
    produces_masks = False
    learning = Learning(per_product="trained", offline=ToyTrainer)
    artifact_options = ("head",)

    def input_spec(self) -> InputSpec:
        return InputSpec(self.backbone.image_size, "square")

    def load_head(self) -> tuple[Head, dict[str, Any]]:
        """The head named by the ``head`` option (checked against this detector and backbone)."""
        head = Head(self.backbone.embed_dim)
        if not self.options.head:
            return head, {"path": None}
        artifact = artifacts.load_artifact(Path(self.options.head).expanduser(), kind=artifacts.LEARNED,
                                           detector=self.name, detector_version=self.version,
                                           backbone=self.backbone.identity, refit_hint=REFIT_HINT)
        head.load_state_dict(artifact.tensors)
        return head, {"path": str(self.options.head), "sha256": artifact.content_hash}

    def feature_request(self, state: ProductState) -> FeatureRequest:
        return FeatureRequest()

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        ctx = ctx or FitContext()
        opts: ToyOptions = self.options
        head, head_meta = self.load_head()
        if not references:
            raise ValueError(f"detector {self.name!r} trains a prototype: it needs k >= 1 references")
        with torch.no_grad():
            z = head(image_embeddings(self.backbone, list(references)))
        ctx.progress(0.05, "embedded references")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            prototype = nn.ParameterDict({"p": nn.Parameter(torch.randn(z.shape[1]))})
        steps_run = 0

        def loss_step(batch: torch.Tensor) -> torch.Tensor:
            nonlocal steps_run
            steps_run += 1
            if opts.step_sleep_s:
                time.sleep(opts.step_sleep_s)
            return (1 - F.normalize(batch, dim=-1) @ F.normalize(prototype["p"], dim=-1)).mean()

        def batches(epoch: int, generator: torch.Generator) -> list[torch.Tensor]:
            return [z + opts.noise * torch.randn(z.shape, generator=generator) for _ in range(opts.steps)]

        checkpoint = None
        if ctx.checkpoint_dir is not None:
            Path(ctx.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            checkpoint = Path(ctx.checkpoint_dir) / "loop.safetensors"
        config = LoopConfig(epochs=opts.epochs, lr=opts.lr, optimizer="adam", steps_per_epoch=opts.steps,
                            seed=opts.seed)
        result = train(prototype, loss_step, batches, config, progress=ctx.section(0.05, 1.0), checkpoint=checkpoint,
                       identity={"shots": len(references), "dim": int(z.shape[1]), "head": head_meta.get("sha256")})
        if result.stopped:
            ctx.check_stop()
        tensors = {"head_weight": head.linear.weight.detach().clone(), "head_bias": head.linear.bias.detach().clone(),
                   "prototype": F.normalize(prototype["p"].detach().clone(), dim=-1)}
        meta = {"shots": len(references), "head": head_meta, "history": result.history,
                "resumed_from_epoch": result.resumed_from_epoch, "steps_run": steps_run,
                "checkpointed": checkpoint is not None}
        return ProductState(self.name, tensors, meta)

    def calibration_scores(self, spec: ProductSpec, references: Sequence[np.ndarray], state: ProductState,
                           ctx: FitContext, has_holdout: bool) -> dict[str, list[float]]:
        """The references themselves against the trained state (no k re-trainings)."""
        return {"references": score_images(self, state, list(references))}

    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        e = F.normalize(features.image_embeddings.float(), dim=-1)
        weight, bias = state.tensors["head_weight"].to(e), state.tensors["head_bias"].to(e)
        z = F.normalize(e @ weight.T + bias, dim=-1)
        return DetectorOutput(0.5 * (1 - z @ state.tensors["prototype"].to(e)), None)
