"""APRIL-GAN (VAND 2023; spec: shared/spec/aprilgan.md): stage adapters trained offline (zero-shot) and
multi-stage memories of the references (few-shot).

Zero-shot: image score = softmax(100 · e_cls · F_t)[abnormal]; map M = Σ_stages softmax(upsampled
100 · norm(k_n F_s^n + b_n) · F_t)[abnormal]. Few-shot (k ≥ 1, adapters unchanged): M_f = Σ_stages
min over the stage memory of (1 − cos) on the unprojected stage tokens, upsampled; map = M + M_f;
image score = text score + max(map). The input is one square resize at the adapters' training size
(518 px on ViT-L-14-336 with interpolated positions; the model's own size elsewhere); WinCLIP tiling is
an option. The adapters come from `inspectd fit aprilgan` (`Learning(offline=AprilGanTrainer)`).

Choices where the report is silent (each configurable): stage tokens are raw block outputs (no
LayerNorm before the adapter, as the official code); the text side uses CLIP's logit scale 100;
the few-shot image score adds the raw max (the official code min-max normalises over the test set,
which a stream cannot do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inspectd.detectors import prompts as P
from inspectd.detectors.aprilgan.adapters import (
    APRILGAN_VERSION,
    AdapterBundle,
    load_adapters,
    stage_logits,
    stage_probabilities,
)
from inspectd.detectors.aprilgan.training import AprilGanTrainer
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features
from inspectd.detectors.base import (
    Detector,
    DetectorOutput,
    Learning,
    ProductSpec,
    ProductState,
    check_input_mode,
    register_detector,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.memory import association_min_distance
from inspectd.detectors.preprocess import InputSpec


@dataclass(frozen=True)
class AprilGanOptions:
    adapters: str = ""  # adapters file from `inspectd fit aprilgan` (required)
    input_mode: str = "square"  # "square": the report's resize | "tile": WinCLIP tiling at the same size
    image_size: int = 0  # 0 = the size the adapters were trained at
    logit_scale: float = 0.0  # the temperature of every two-class softmax; 0 = the adapters' own (their file
    #                           records what they were trained with: 100, CLIP's, unless --logit-scale said)
    use_memory: bool = True  # few-shot visual map with k >= 1 references
    defect_words: bool = False  # add the product's defect words as abnormal states (the report uses generic ones)

    def __post_init__(self) -> None:  # here, so `inspectd run --check` / `product put` reject what a build would
        where = "detector 'aprilgan' options"
        check_input_mode(where, self.input_mode)
        if not self.adapters:
            raise ValueError(f"{where}.adapters must name the file written by `inspectd fit aprilgan --out FILE` "
                             "with this product's CLIP model")
        if self.image_size < 0:
            raise ValueError(f"{where}.image_size must be >= 0 (0 = the adapters' own), got {self.image_size}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale >= 0):
            raise ValueError(f"{where}.logit_scale must be >= 0 (0 = the adapters' own), got {self.logit_scale}")


@register_detector
class AprilGan(Detector):
    """APRIL-GAN zero-shot (adapters) and few-shot (adapters + per-stage reference memories)."""

    name = "aprilgan"
    version = APRILGAN_VERSION
    Options = AprilGanOptions
    produces_masks = True
    learning = Learning(per_product="fitted", offline=AprilGanTrainer)
    artifact_options = ("adapters",)

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        patch, size = backbone.patch_size, self.options.image_size
        if size % patch:  # the patch grid would cover floor(size / patch) patches, its map stretched over all of it
            below, above = size // patch * patch, (size // patch + 1) * patch
            raise ValueError(f"detector 'aprilgan' options.image_size must be a multiple of the model's patch size "
                             f"{patch} (0 = the adapters' own), got {size}: use {below or above} or {above}")
        self._bundle: AdapterBundle | None = None

    @property
    def bundle(self) -> AdapterBundle:
        if self._bundle is None:
            self._bundle = load_adapters(self.options.adapters, self.backbone)
        return self._bundle

    def load_learned(self) -> None:
        _ = self.bundle

    def loaded_hash(self, option: str) -> str | None:
        return self._bundle.content_hash if option == "adapters" and self._bundle is not None else None

    def input_spec(self) -> InputSpec:
        return InputSpec(self.options.image_size or self.bundle.image_size, self.options.input_mode)

    @property
    def logit_scale(self) -> float:
        """The softmax temperature: the option's, else the one the adapters were trained with."""
        return self.options.logit_scale or float(self.bundle.artifact.config.get("logit_scale", 100.0))

    # ------------------------------------------------------------------ building a product state
    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        anomalous = P.APRILGAN_ANOMALOUS_STATES + (P.defect_states(spec.defect_words) if self.options.defect_words
                                                   else ())
        tensors = {"text_prototypes": P.text_prototypes(self.backbone, P.APRILGAN_NORMAL_STATES, anomalous,
                                                        P.APRILGAN_TEMPLATES, spec.object_name)}
        meta: dict[str, Any] = {"object_name": spec.object_name, "shots": len(references),
                                "stages": list(self.bundle.stages), "adapters_sha256": self.bundle.content_hash}
        if references and self.options.use_memory:
            feats = self.reference_features(references, FeatureRequest(blocks=frozenset(self.bundle.stages)))
            for stage in self.bundle.stages:
                tokens = feats.blocks[stage]
                tensors[f"memory_stage_{stage}"] = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)
        return ProductState(self.name, tensors, meta)

    def mask_scale(self, state: ProductState) -> float:
        """Σ of one probability per stage, plus (few-shot) Σ of one (1 − cos) ∈ [0, 2] per stage."""
        stages = len(self.bundle.stages)
        few_shot = self.options.use_memory and f"memory_stage_{self.bundle.stages[0]}" in state.tensors
        return float(stages * (3 if few_shot else 1))

    def feature_request(self, state: ProductState) -> FeatureRequest:
        return FeatureRequest(blocks=frozenset(self.bundle.stages))

    # ------------------------------------------------------------------ scoring
    def text_score(self, features: Features, state: ProductState) -> torch.Tensor:
        return P.two_class_anomaly_score(features.image_embeddings, state.tensors["text_prototypes"],
                                         self.logit_scale)

    def zero_shot_map(self, features: Features, state: ProductState) -> torch.Tensor:
        """M = Σ_stages abnormal probability of the adapted stage tokens, at input resolution: [N, S, S]."""
        size = self.input_spec().size
        text = state.tensors["text_prototypes"]
        adapted = self.bundle.adapt([features.blocks[s] for s in self.bundle.stages])
        total = None
        for tokens in adapted:
            logits = stage_logits(tokens, text, self.logit_scale, features.grid)
            prob = stage_probabilities(logits, size)[:, 1]  # the same maths the trainer's loss sees
            total = prob if total is None else total + prob
        return total

    def memory_map(self, features: Features, state: ProductState) -> torch.Tensor | None:
        """M_f = Σ_stages min over the stage memory of (1 − cos), upsampled: [N, S, S], or None (zero-shot)."""
        if not self.options.use_memory or f"memory_stage_{self.bundle.stages[0]}" not in state.tensors:
            return None
        size = self.input_spec().size
        total = None
        for stage in self.bundle.stages:
            distance = 2.0 * association_min_distance(features.blocks[stage], state.tensors[f"memory_stage_{stage}"])
            grid_map = distance.reshape(-1, 1, *features.grid)
            up = F.interpolate(grid_map, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
            total = up if total is None else total + up
        return total

    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        if state.meta.get("adapters_sha256") != self.bundle.content_hash:
            raise ValueError("detector 'aprilgan': the product state was fitted with other adapters "
                             f"(sha256 {str(state.meta.get('adapters_sha256'))[:12]}) than the detector loaded "
                             f"({self.bundle.content_hash[:12]}); rebuild the product")
        with torch.inference_mode():
            text = self.text_score(features, state)
            amap = self.zero_shot_map(features, state)
            visual = self.memory_map(features, state)
            if visual is None:
                return DetectorOutput(text, amap)
            amap = amap + visual
            return DetectorOutput(text + amap.flatten(1).max(dim=1).values, amap)
