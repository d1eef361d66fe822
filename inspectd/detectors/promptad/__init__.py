"""PromptAD (CVPR 2024; spec: shared/spec/promptad.md): prompts learned per product from its k normal images only,
fused with a patch memory of the references.

Fit (``Learning(per_product="trained")``): the k references go once through the V-V dual-path tower
(`tower.py`); two prompt sets are trained on the frozen features through the shared loop: the *image* set on the
original-path CLS g, the *pixel* set on the V-V patch embeddings T (the official code's two runs, ``train_cls.py``
and ``train_seg.py``: their parameters are disjoint and every optimiser state is per parameter, so one loop over
the summed losses makes exactly the updates of two separate runs). Each set's loss is
L_ce + L_eam + λ·L_align (`losses.py`) with SGD 0.002 / momentum 0.9 / weight decay 5e-4, a cosine schedule to
1e-5 over ``steps`` steps (the code's 100 epochs of one all-shot batch) and no augmentation. The last step is
kept: no model selection (the official code keeps the best epoch *on the test set*, pitfall 4).

State: the learned contexts, the two sets' text prototypes [n̄, ā] and the memories (original-path residual
tokens after blocks 3 and 8 of 12, scaled for other depths). Score (spec §2.7):
S_t = softmax(s·[<g,n̄>, <g,ā>])[1]; M_t(p) likewise with T_p and the pixel set; M_v(p) = mean over layers of
min (1 − cos)/2 to the memory; map = 1/(1/M_t + 1/M_v), bilinear to the input, Gaussian blur;
image score = 1/(1/S_t + 1/max up(M_v)). ``use_memory: false`` is the "w/o VAD" variant: S_t and M_t alone.

Choices where the sources are silent or disagree (each an option): s is CLIP's *raw* logit-scale parameter
(ln 100 ≈ 4.6 for trained CLIP; the code never exponentiates it, pitfall 1; ``logit_scale`` overrides); N = 1
prompt per set (the supplement; the code's cls run uses 3: ``image_prompts``); the supplement's 5 generic
suffixes (``generic_suffixes: code`` for the code's 8) + the published list of the category (``inspectd eval``
names products by category; in the daemon the object name is tried as a key too) + the product's defect words;
the LAP token before the object name (as the code); EAM per patch (pitfall 7); the blur's sigma is in pixels of
the model input (the code blurs at 400 px: its σ = 4 is 2.4 at 240, the default); the input is one square resize at the
model's size (the code squashes to 240 × 240). Calibration scores shifted views of the references against the
trained state (no k re-trainings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features
from inspectd.detectors.base import (
    Detector,
    DetectorOutput,
    Learning,
    ProductSpec,
    ProductState,
    check_eps,
    check_input_mode,
    check_memory_layers,
    register_detector,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.memory import association_min_distance
from inspectd.detectors.pipeline import score_images
from inspectd.detectors.preprocess import InputSpec, shifted_views
from inspectd.detectors.promptad import prompts as PP
from inspectd.detectors.promptad.losses import LossTerms, promptad_terms, prototypes
from inspectd.detectors.promptad.tower import TOWER, memory_blocks
from inspectd.detectors.training.loop import LoopConfig, TrainResult, train

SETS = ("image", "pixel")


@dataclass(frozen=True)
class PromptAdOptions:
    steps: int = 100  # optimiser steps, one per epoch over all k shots (the code: 100 epochs); fewer = faster
    lr: float = 0.002  # SGD (CoOp's values, supplement §A)
    momentum: float = 0.9
    weight_decay: float = 0.0005
    min_lr: float = 1e-5  # cosine floor (the code's eta_min)
    n_ctx: int = 4  # E_N learnable tokens of a normal prompt
    n_ctx_anomaly: int = 1  # E_A learnable tokens of a learnable anomaly prompt
    n_learned_anomaly: int = 4  # L learnable anomaly prompts
    image_prompts: int = 1  # N of the image-level set (supplement: 1; the code's cls run: 3)
    pixel_prompts: int = 1  # N of the pixel-level set
    align_weight: float = 0.001  # λ of the MAP-LAP alignment
    margin: float = 0.0  # r of the explicit anomaly margin (the released code: 0)
    logit_scale: float = 0.0  # 0 = the model's raw logit-scale parameter ln(scale), as the code
    generic_suffixes: str = "paper"  # "paper" (5) | "code" (8)
    builtin_suffixes: bool = True  # add the published MVTec/VisA suffix list of the category
    use_memory: bool = True  # fuse the visual memory (False: the "w/o VAD" text-only variant)
    memory_layers: tuple[int, ...] = ()  # 1-based blocks of the memory; () = 3 and 8 of 12, scaled to the depth
    blur_sigma: float = 2.4  # Gaussian blur of the map in model-input pixels (the code's σ 4 at 400 px; 0 = none)
    eps: float = 1e-6  # floor before the harmonic fusions
    input_mode: str = "square"  # "square": one resize at the model size | "tile": WinCLIP tiling
    checkpoint_every: int = 1  # steps between checkpoints of a background fit (resume after a stop)

    def __post_init__(self) -> None:  # here, so `inspectd run --check` / `product put` reject what a build would
        where = "detector 'promptad' options"
        check_input_mode(where, self.input_mode)
        if self.generic_suffixes not in PP.GENERIC_SUFFIXES:
            raise ValueError(f"{where}.generic_suffixes must be one of {sorted(PP.GENERIC_SUFFIXES)}, "
                             f"not {self.generic_suffixes!r}")
        for key in ("steps", "n_ctx", "n_ctx_anomaly", "n_learned_anomaly", "image_prompts", "pixel_prompts",
                    "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{where}.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{where}.momentum must be within [0, 1), got {self.momentum}")
        for key in ("weight_decay", "min_lr", "logit_scale"):  # (a negative logit_scale swaps normal and anomalous)
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        check_eps(where, self.eps)
        check_memory_layers(where, self.memory_layers)


class PromptAdPrompts(nn.Module):
    """The trained part: one `PromptSet` per set name (its state dict = the learnable contexts)."""

    def __init__(self, sets: Mapping[str, PP.PromptSet]) -> None:
        super().__init__()
        self.sets = nn.ModuleDict(dict(sets))

    def text_features(self, backbone: ClipBackbone) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per set: (normal, manual, learned) text features, all sets in one text-tower pass."""
        names = list(self.sets)
        return dict(zip(names, PP.encode_sets(backbone, [self.sets[n] for n in names]), strict=True))


@register_detector
class PromptAd(Detector):
    """PromptAD: per-product learned prompts (image and pixel sets) + the V-V tower's patch memory."""

    name = "promptad"
    version = 1
    Options = PromptAdOptions
    produces_masks = True
    learning = Learning(per_product="trained")

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        opts: PromptAdOptions = self.options
        self.blocks = memory_blocks(len(backbone.visual.transformer.resblocks), tuple(opts.memory_layers))

    def input_spec(self) -> InputSpec:
        return InputSpec(self.backbone.image_size, self.options.input_mode)

    @property
    def scale(self) -> float:
        return self.options.logit_scale or math.log(self.backbone.logit_scale)

    def feature_request(self, state: ProductState | None = None) -> FeatureRequest:
        memory = self.options.use_memory
        return FeatureRequest(tower=TOWER, patch_embeddings=True, blocks=frozenset(self.blocks if memory else ()))

    # ------------------------------------------------------------------ building a product state
    def prompt_module(self, spec: ProductSpec, seed: int) -> PromptAdPrompts:
        """Freshly initialised prompt sets for ``spec`` (seeded; the caller's RNG untouched)."""
        opts: PromptAdOptions = self.options
        obj = PP.prompt_object_name(spec.product, spec.object_name)
        suffixes = PP.anomaly_suffixes(spec.product, spec.object_name, spec.defect_words, opts.generic_suffixes,
                                       opts.builtin_suffixes)
        generator = torch.Generator().manual_seed(int(seed))
        counts = {"image": opts.image_prompts, "pixel": opts.pixel_prompts}
        sets = {name: PP.PromptSet(self.backbone, obj, suffixes, counts[name], opts.n_ctx, opts.n_learned_anomaly,
                                   opts.n_ctx_anomaly, generator) for name in SETS}
        return PromptAdPrompts(sets).to(self.backbone.device)

    def loss_terms(self, module: PromptAdPrompts, visual: Mapping[str, torch.Tensor]) -> dict[str, LossTerms]:
        """Per set, the loss terms of its text features against its visual features (normalised)."""
        text = module.text_features(self.backbone)
        return {name: promptad_terms(visual[name], *text[name], scale=self.scale, margin=self.options.margin)
                for name in SETS}

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        ctx = ctx or FitContext()
        if not references:
            raise ValueError("detector 'promptad' learns its prompts from normal images: it needs k >= 1 references")
        feats = self.reference_features(references, self.feature_request())
        visual = {"image": F.normalize(feats.image_embeddings.clone(), dim=-1),  # out of inference mode
                  "pixel": F.normalize(feats.patch_embeddings.clone(), dim=-1)}
        ctx.progress(0.05, "embedded references")
        ctx.check_stop()
        module = self.prompt_module(spec, ctx.seed)
        result = self._train(module, visual, ctx, len(references))
        tensors = self._state_tensors(module, feats)
        meta = {"object_name": spec.object_name, "shots": len(references), "seed": ctx.seed,
                "prompts": {name: module.sets[name].texts for name in SETS}, "memory_blocks": list(self.blocks),
                "logit_scale": self.scale, "history": result.history, "resumed_from_epoch": result.resumed_from_epoch,
                "steps_run": len(result.history) - result.resumed_from_epoch}
        return ProductState(self.name, tensors, meta)

    def _train(self, module: PromptAdPrompts, visual: Mapping[str, torch.Tensor], ctx: FitContext,
               shots: int) -> TrainResult:
        opts: PromptAdOptions = self.options

        def loss_step(_: object) -> torch.Tensor:
            terms = self.loss_terms(module, visual)
            return sum(t.total(opts.align_weight) for t in terms.values())

        config = LoopConfig(epochs=opts.steps, lr=opts.lr, steps_per_epoch=1, optimizer="sgd", momentum=opts.momentum,
                            weight_decay=opts.weight_decay, schedule="cosine", min_lr=min(opts.min_lr, opts.lr),
                            seed=int(ctx.seed), checkpoint_every=opts.checkpoint_every)
        checkpoint = None
        if ctx.checkpoint_dir is not None:
            Path(ctx.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            checkpoint = Path(ctx.checkpoint_dir) / "loop.safetensors"
        identity = {"detector": self.name, "version": self.version, "shots": shots,
                    "prompts": {n: module.sets[n].texts for n in SETS}}
        result = train(module, loss_step, lambda epoch, generator: [None], config,
                       progress=ctx.section(0.05, 0.95), checkpoint=checkpoint, identity=identity)
        if result.stopped:
            ctx.check_stop()
        return result

    @torch.no_grad()
    def _state_tensors(self, module: PromptAdPrompts, feats: Features) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, (normal, manual, learned) in module.text_features(self.backbone).items():
            normal_proto, anomaly_proto, _ = prototypes(normal, manual, learned)
            tensors[f"text_{name}"] = torch.stack([normal_proto, anomaly_proto]).float().contiguous()
            tensors[f"normal_ctx_{name}"] = module.sets[name].normal_ctx.detach().float().clone()
            tensors[f"abnormal_ctx_{name}"] = module.sets[name].abnormal_ctx.detach().float().clone()
        if self.options.use_memory:
            for block in self.blocks:
                tokens = feats.blocks[block]
                tensors[f"memory_block_{block}"] = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1).clone()
        return tensors

    def calibration_scores(self, spec: ProductSpec, references: Sequence[np.ndarray], state: ProductState,
                           ctx: FitContext, has_holdout: bool) -> dict[str, list[float]]:
        """Four shifted views of every reference against the trained state (no re-training; the references
        themselves would score ~0 against a memory that holds them)."""
        views = [view for image in references for view in shifted_views(image)]
        ctx.check_stop()
        scores = score_images(self, state, views)
        ctx.progress(1.0, "calibrated on shifted views")
        return {"shifted_views": scores}

    # ------------------------------------------------------------------ scoring
    def text_maps(self, features: Features, state: ProductState) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_t [N], M_t [N, L]): the anomaly probability of the CLS and of each V-V patch."""
        g = F.normalize(features.image_embeddings.float(), dim=-1)
        t = F.normalize(features.patch_embeddings.float(), dim=-1)
        s_t = torch.softmax(self.scale * g @ state.tensors["text_image"].to(g).T, dim=-1)[..., 1]
        m_t = torch.softmax(self.scale * t @ state.tensors["text_pixel"].to(t).T, dim=-1)[..., 1]
        return s_t, m_t

    def memory_map(self, features: Features, state: ProductState) -> torch.Tensor | None:
        """M_v [N, L]: the mean over memory layers of min (1 − cos)/2 to the references' tokens (None: no memory)."""
        if not self.options.use_memory or f"memory_block_{self.blocks[0]}" not in state.tensors:
            return None
        maps = [association_min_distance(features.blocks[b].float(), state.tensors[f"memory_block_{b}"])
                for b in self.blocks]
        return torch.stack(maps).mean(dim=0)

    def upsample(self, patch_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = self.input_spec().size
        return F.interpolate(patch_map.reshape(-1, 1, *grid), size=(size, size), mode="bilinear",
                             align_corners=False)[:, 0]

    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        eps = self.options.eps
        with torch.inference_mode():
            s_t, m_t = self.text_maps(features, state)
            m_v = self.memory_map(features, state)
            if m_v is None:
                return DetectorOutput(s_t, gaussian_blur(self.upsample(m_t, features.grid), self.options.blur_sigma))
            fused = 1.0 / (1.0 / m_t.clamp_min(eps) + 1.0 / m_v.clamp_min(eps))
            amap = gaussian_blur(self.upsample(fused, features.grid), self.options.blur_sigma)
            visual_max = self.upsample(m_v, features.grid).flatten(1).max(dim=1).values
            image = 1.0 / (1.0 / s_t.clamp_min(eps) + 1.0 / visual_max.clamp_min(eps))
            return DetectorOutput(image, amap)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) of each [N, H, W] map (mode "reflect": edge-including mirror),
    separable: the mirrored rows/columns gathered, then one 1-D convolution per axis (2.5x an unfold + matvec,
    whose strided matmul torch runs as one small copy and GEMV per map row: 1.5 vs 3.3 ms for 2 maps of 240 px).
    On a GPU cuDNN runs fp32 convolutions in TF32 by default (as the tower's patch embedding): ~1e-3 relative."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps
    for dim, weight in ((-1, kernel.view(1, 1, 1, -1)), (-2, kernel.view(1, 1, -1, 1))):
        n = out.shape[dim]
        index = torch.arange(-radius, n + radius, device=maps.device) % (2 * n)
        index = torch.where(index < n, index, 2 * n - 1 - index)
        out = F.conv2d(out.index_select(dim, index).unsqueeze(1), weight).squeeze(1)
    return out
