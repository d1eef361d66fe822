"""Training AnoPLe's learned part from normal images only: the recipe, one training step, and `inspectd fit anople`.

A step takes one image (batch size 1, spec §2.9), makes a DRAEM pseudo-anomaly at 2S (``synthesis.py``), cuts
both images into the 5 views (full view with c₅, 4 crops with c₁..c₄; a crop whose mask is empty keeps the
normal label, pitfall 12) and runs all 10 through the prompted tower with gradients to the prompts. Every view
gets L_pixel, the image CE and L_align; the normal views also give the latent-noise CE (ε ~ N(0, σ²) on the
L2-normalised global embedding, σ = SimpleNet's 0.015: the paper gives none). SGD (momentum 0.9, weight decay
1e-5), prompt learner lr 1e-3 and decoder lr 2e-4, linear warm-up from 0 over ``warmup_fraction`` of the steps,
then constant (the paper gives neither the length nor what follows). Multi-class: one model over the k shots of
every product; AnoPLe* (``anople-star``) runs the same on one product's references.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from inspectd.detectors.anople import losses as L
from inspectd.detectors.anople.model import AnoPleModel, Architecture, class_word, model_artifact
from inspectd.detectors.anople.synthesis import (
    SynthesisConfig,
    quadrants,
    resize_image,
    resize_mask,
    synthesize,
)
from inspectd.detectors.anople.tower import TOWER, anople_forward
from inspectd.detectors.artifacts import Artifact
from inspectd.detectors.backbone import FeatureRequest
from inspectd.detectors.context import FitContext
from inspectd.detectors.preprocess import InputSpec
from inspectd.detectors.training.loop import LoopConfig, ProgressSink, TrainResult, train
from inspectd.detectors.training.trainer import Trainer, TrainingData

PROTOTYPES = ("class", "dataset")


def dataset_prototypes(text: torch.Tensor) -> torch.Tensor:
    """[C, 2, D] per-class (w⁺, w⁻) -> [2, D]: normalised means over the classes (WinCLIP-style averaging)."""
    return F.normalize(text.mean(dim=0), dim=-1)


@dataclass(frozen=True)
class Recipe:
    """How the learned part is trained (the trainer's flags and AnoPLe*'s options)."""

    epochs: int = 60
    lr: float = 0.001  # prompt learner: contexts, couplings, view tokens
    decoder_lr: float = 0.0002
    momentum: float = 0.9
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.1  # linear warm-up from 0 over this fraction of all steps
    batch_size: int = 1  # images per step (each gives 10 views)
    multi_view: bool = True  # False: the full view only (2 images per step instead of 10; faster, not the paper)
    text_ctx: int = 3
    visual_ctx: int = 3
    prompt_depth: int = 0  # 0 = 9 of 12 layers, scaled
    decoder_size: int = 0  # 0 = 2 x the patch grid
    decoder_width: int = 0  # 0 = the joint dimension
    logit_scale: float = 0.0  # 1/τ of the CE and pixel softmax; 0 = CLIP's (100 for trained CLIP)
    latent_sigma: float = 0.015
    label_smoothing: float = 0.003
    align_tau: float = 2.0
    focal_gamma: float = 2.0
    min_cover: float = 0.02
    max_cover: float = 0.25
    texture_dir: str = ""  # "" = the image itself as the DRAEM anomaly source
    per_layer_coupling: bool = False  # one coupling pair per prompted layer instead of one shared pair
    view_token_every_layer: bool = False  # re-insert the view token at every prompted layer (default: input only)
    prototypes: str = "class"  # w± of each image's own class | "dataset": averaged over all classes (pitfall 3a)

    def __post_init__(self) -> None:
        """Refuses what the training loop or the model would refuse only once they run (after a model load of
        minutes): each message starts with the field (`inspectd fit anople --<field>`, AnoPLe*'s options.<field>)."""
        if self.prototypes not in PROTOTYPES:
            raise ValueError(f"prototypes must be one of {PROTOTYPES}, not {self.prototypes!r}")
        for key in ("epochs", "batch_size", "text_ctx", "visual_ctx"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("prompt_depth", "decoder_size", "decoder_width"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = the default), got {getattr(self, key)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.decoder_lr) and self.decoder_lr >= 0):
            raise ValueError(f"decoder_lr must be >= 0 (0 = the decoder stays as initialised), got {self.decoder_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be within [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be within [0, 1), got {self.warmup_fraction}")
        if not 0.0 < self.min_cover <= self.max_cover < 1.0:
            raise ValueError(f"max_cover: need 0 < min_cover <= max_cover < 1, got {self.min_cover}, {self.max_cover}")

    def architecture(self) -> Architecture:
        return Architecture(text_ctx=self.text_ctx, visual_ctx=self.visual_ctx, prompt_depth=self.prompt_depth,
                            decoder_size=self.decoder_size, decoder_width=self.decoder_width,
                            per_layer_coupling=self.per_layer_coupling,
                            view_token_every_layer=self.view_token_every_layer)

    def synthesis(self) -> SynthesisConfig:
        return SynthesisConfig(min_cover=self.min_cover, max_cover=self.max_cover, texture_dir=self.texture_dir)

    def loop(self, steps_per_epoch: int, seed: int, checkpoint_every: int = 1) -> LoopConfig:
        total = self.epochs * steps_per_epoch
        warmup = min(total - 1, math.ceil(self.warmup_fraction * total)) if self.warmup_fraction > 0 else 0
        return LoopConfig(epochs=self.epochs, lr=self.lr, steps_per_epoch=steps_per_epoch, optimizer="sgd",
                          momentum=self.momentum, weight_decay=self.weight_decay, warmup_steps=warmup, seed=seed,
                          checkpoint_every=checkpoint_every)


@dataclass
class Sample:
    name: str  # the class word of its prompts
    image: np.ndarray  # RGB uint8 at 2S x 2S


@dataclass
class Views:
    """The rows of one step: pixels [R, 3, S, S], masks [R, S, S], labels/views/classes [R], normal [R]."""

    pixels: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor
    classes: torch.Tensor
    normal: torch.Tensor


class StepRunner:
    """Builds a step's views and its loss terms for an `AnoPleModel` on a frozen backbone."""

    def __init__(self, backbone: Any, model: AnoPleModel, recipe: Recipe, names: Sequence[str]) -> None:
        self.backbone, self.model, self.recipe = backbone, model, recipe
        self.size = backbone.image_size
        self.preprocess = backbone.preprocessor_for(InputSpec(self.size, "square"))
        self.synthesis = recipe.synthesis()
        self.names = list(dict.fromkeys(names))
        self.scale = recipe.logit_scale or backbone.logit_scale

    def views(self, samples: Sequence[Sample], seeds: Sequence[int]) -> Views:
        s, full = self.size, self.model.full_view
        pixels, masks, labels, views, classes, normal = [], [], [], [], [], []
        for sample, seed in zip(samples, seeds, strict=True):
            anomaly = synthesize(sample.image, self.synthesis, np.random.default_rng(seed))
            for image, mask, is_normal in ((sample.image, np.zeros_like(anomaly.mask), True),
                                           (anomaly.image, anomaly.mask, False)):
                crops = list(zip(quadrants(image, s), quadrants(mask, s), range(4), strict=True))
                rows = [(resize_image(image, s), resize_mask(mask, s), full)] + (crops if self.recipe.multi_view
                                                                                 else [])
                for view_image, view_mask, view in rows:
                    pixels.append(self.preprocess(np.ascontiguousarray(view_image))[0])
                    masks.append(torch.from_numpy(np.ascontiguousarray(view_mask)))
                    labels.append(int(view_mask.any()))
                    views.append(view)
                    classes.append(self.names.index(sample.name))
                    normal.append(is_normal)
        device = self.backbone.device
        return Views(torch.cat(pixels).to(device), torch.stack(masks).to(device), torch.tensor(labels, device=device),
                     torch.tensor(views, device=device), torch.tensor(classes, device=device),
                     torch.tensor(normal, device=device))

    def terms(self, rows: Views) -> L.Terms:
        r, model = self.recipe, self.model
        request = FeatureRequest(tower=TOWER, patch_tokens=True)
        feats = anople_forward(self.backbone, rows.pixels, request, model.row_inputs(rows.views))
        text = model.text_features(self.backbone, self.names)
        if r.prototypes == "dataset":
            text = dataset_prototypes(text)[None].expand(len(self.names), -1, -1)
        text = text[rows.classes]  # [R, 2, D]
        z = feats.image_embeddings
        dense = model.decoder(feats.patch_tokens, feats.grid)
        logits = L.pixel_logits(dense, text, self.scale)
        prob = L.upsample(torch.softmax(logits, dim=1)[:, 1], self.size)
        normal = rows.normal
        noise = r.latent_sigma * torch.randn(int(normal.sum()), z.shape[1], device=z.device)
        return L.Terms(pixel=L.pixel_loss(prob, rows.masks, r.focal_gamma),
                       image=L.image_loss(L.image_logits(z, text, self.scale), rows.labels),
                       latent=L.latent_loss(z[normal], text[normal], noise, self.scale, r.label_smoothing),
                       align=L.alignment_loss(z, dense, logits[:, 1], r.align_tau))


def prepare_samples(backbone: Any, named_images: Sequence[tuple[str, np.ndarray]]) -> list[Sample]:
    """Each image resized once to the 2S square the views are cut from."""
    return [Sample(name, resize_image(image, 2 * backbone.image_size)) for name, image in named_images]


def fit_model(backbone: Any, named_images: Sequence[tuple[str, np.ndarray]], recipe: Recipe, seed: int,
              progress: ProgressSink | None = None, checkpoint: Path | None = None, tqdm_desc: str | None = None,
              checkpoint_every: int = 1) -> tuple[AnoPleModel, TrainResult]:
    """Train a fresh, seeded `AnoPleModel` on (class word, normal image) pairs; returns it in eval mode."""
    if not named_images:
        raise ValueError("AnoPLe learns from normal images: it needs at least one")
    samples = prepare_samples(backbone, named_images)
    model = AnoPleModel(backbone, recipe.architecture(), torch.Generator().manual_seed(int(seed)))
    model.to(backbone.device)
    runner = StepRunner(backbone, model, recipe, [s.name for s in samples])
    batch = max(1, recipe.batch_size)
    steps = math.ceil(len(samples) / batch)

    def batches(epoch: int, generator: torch.Generator) -> list[list[tuple[int, int]]]:
        order = torch.randperm(len(samples), generator=generator).tolist()
        seeds = torch.randint(1 << 62, (len(samples),), generator=generator).tolist()
        plan = list(zip(order, seeds, strict=True))
        return [plan[i:i + batch] for i in range(0, len(plan), batch)]

    def loss_step(items: list[tuple[int, int]]) -> torch.Tensor:
        rows = runner.views([samples[i] for i, _ in items], [s for _, s in items])
        return runner.terms(rows).total()

    groups = [{"params": model.prompt_parameters(), "lr": recipe.lr},
              {"params": list(model.decoder.parameters()), "lr": recipe.decoder_lr}]
    identity = {"detector": "anople", "names": [s.name for s in samples], "images": len(samples),
                "architecture": dataclasses.asdict(model.arch), "backbone": backbone.identity}
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    result = train(model, loss_step, batches, recipe.loop(steps, int(seed), checkpoint_every), params=groups,
                   progress=progress, tqdm_desc=tqdm_desc, checkpoint=checkpoint, identity=identity)
    model.requires_grad_(False)
    return model, result


@dataclass(frozen=True)
class AnoPleFitConfig(Recipe):
    """`inspectd fit anople` flags."""

    shots: int = 0  # normal images per product (its first k references; with --root the k-shot set `inspectd eval`
    #                 draws for --seed); 0 = all
    seed: int = 0

    help: ClassVar[dict[str, str]] = {
        "epochs": "epochs over all images (paper: 60)", "lr": "SGD lr of prompts, couplings and view tokens",
        "decoder_lr": "SGD lr of the decoder", "warmup_fraction": "linear warm-up over this fraction of steps",
        "multi_view": "train on the 4 crops + full view (paper) or the full view only",
        "text_ctx": "textual context length C_t (MVTec 3, VisA 5)",
        "visual_ctx": "visual context length C_v (MVTec 3, VisA 8)",
        "prompt_depth": "prompted layers J (0 = 9 of 12, scaled)",
        "shots": "images per product: a product's first k references; with --root each category's k-shot set that "
                 "`inspectd eval --shots k` draws for --seed (train one model per k and seed); 0 = all",
        "texture_dir": "folder of DRAEM anomaly-source textures (default: the image itself)",
        "prototypes": "class: w± of each image's class word; dataset: averaged over all classes",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.shots < 0:
            raise ValueError("epochs must be >= 1 and shots >= 0")


class AnoPleTrainer(Trainer):
    """Trains the multi-class AnoPLe model on the normal references of many products (or dataset categories)."""

    detector = "anople"
    Config = AnoPleFitConfig
    data = "products"
    default_model = ("ViT-B-16-plus-240", "laion400m_e32")  # PromptAD's official weights (spec 2.1: comparable)
    description = ("Train AnoPLe's multi-class prompts, couplings, view tokens and decoder on normal images of "
                   "several products (--products-dir) or dataset categories (--root); pseudo-anomalies only. "
                   "Products point to the file with `options: {model: FILE}`.")

    def train(self, data: TrainingData, ctx: FitContext, checkpoint: Path | None = None,
              show_progress: bool = True) -> Artifact:
        cfg: AnoPleFitConfig = self.config
        named = [(class_word(spec.product, spec.object_name), image) for spec, images in data.products
                 for image in (images[:cfg.shots] if cfg.shots else images)]
        loop_checkpoint = None
        if checkpoint is not None:
            loop_checkpoint = Path(checkpoint) / "loop.safetensors"
        model, result = fit_model(self.backbone, named, cfg, cfg.seed, progress=ctx, checkpoint=loop_checkpoint,
                                  tqdm_desc="train AnoPLe" if show_progress else None)
        ctx.check_stop()
        summary = dict(data.summary)
        summary.update({"images": len(named), "classes": sorted({n for n, _ in named}),
                        "products": [spec.product for spec, _ in data.products]})
        return model_artifact(model, self.backbone, {"fit": dataclasses.asdict(cfg), "prototypes": cfg.prototypes,
                                                     "classes": sorted({n for n, _ in named}),
                                                     "logit_scale": cfg.logit_scale or self.backbone.logit_scale},
                              {"data": summary, "history": result.history,
                               "resumed_from_epoch": result.resumed_from_epoch})
