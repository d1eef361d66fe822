"""WinCLIP (zero-shot) and WinCLIP+ (few-shot) anomaly classification and segmentation.

Spec: shared/spec/winclip.md. Zero-shot: compositional prompt ensemble, two-class softmax on the
image embedding and on window embeddings (2x2 and 3x3, stride 1, token dropping), per-patch
harmonic averaging over covering windows, multi-scale harmonic aggregation with the image-scale
score. Few-shot (k >= 1 references): min-distance association to memories of small-window,
mid-window and last-layer patch features; M^W = their mean; map = w * zero-shot + (1 - w) * M^W;
image score = 1/2 (zero-shot image score + max M^W).
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
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features, window_coverage
from inspectd.detectors.base import (
    Detector,
    DetectorOutput,
    ProductSpec,
    ProductState,
    check_eps,
    check_multi_crop,
    register_detector,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.memory import association_min_distance, harmonic_mean, harmonic_window_to_patch

PATCH_FEATURES = ("ln_post", "proj", "raw")
UPSAMPLE_MODES = ("bilinear", "nearest")


@dataclass(frozen=True)
class WinClipOptions:
    window_sizes: tuple[int, ...] = (2, 3)  # small and mid scale, in patches
    use_image_scale: bool = True  # image-scale score in the multi-scale harmonic mean
    language_weight: float = 0.5  # few-shot map = w * zero-shot map + (1 - w) * M^W (paper: "averaging")
    patch_feature: str = "ln_post"  # R^P features: "ln_post" (last block after ln_post) | "proj" | "raw"
    logit_scale: float = 0.0  # 0 = the model's own (100 for trained CLIP)
    eps: float = 1e-6  # clamp before harmonic means
    upsample: str = "bilinear"  # patch grid -> pixels: "bilinear" | "nearest"
    multi_crop: int = 0  # image score averaged over the full view and this many 80 % crops (paper: 90.8 -> 91.8
    #                      image AUROC); maps come from the full view only. Off by default: it costs 1+n passes

    def __post_init__(self) -> None:  # here, so `inspectd check` / `product put` reject what a build would
        where = "detector 'winclip' options"
        sizes = self.window_sizes
        if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes) \
                or len(set(sizes)) != len(sizes):
            raise ValueError(f"{where}.window_sizes must be distinct whole numbers of patches >= 1 (spec: [2, 3]), "
                             f"got {list(sizes)}")
        if not 0.0 <= self.language_weight <= 1.0:
            raise ValueError(f"{where}.language_weight must be within [0, 1], got {self.language_weight}")
        if self.patch_feature not in PATCH_FEATURES:
            raise ValueError(f"{where}.patch_feature must be one of {', '.join(PATCH_FEATURES)}, "
                             f"not {self.patch_feature!r}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale >= 0):
            raise ValueError(f"{where}.logit_scale must be >= 0 (0 = the model's own), got {self.logit_scale}")
        check_eps(where, self.eps)
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"{where}.upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        check_multi_crop(where, self.multi_crop)


@register_detector
class WinClip(Detector):
    """WinCLIP / WinCLIP+ (the number of references decides which)."""

    name = "winclip"
    Options = WinClipOptions
    produces_masks = True

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        grid = min(self.backbone.grid)
        if max(self.options.window_sizes) > grid:  # no such window: the maps would be 0/0
            raise ValueError(f"detector 'winclip' options.window_sizes {list(self.options.window_sizes)}: "
                             f"{self.backbone.model_id} has a {grid} x {grid} patch grid, so windows of at most "
                             f"{grid} patches")

    # ------------------------------------------------------------------ building a product state
    def _text_prototypes(self, spec: ProductSpec) -> torch.Tensor:
        anomalous = P.WINCLIP_ANOMALOUS_STATES + P.defect_states(spec.defect_words)
        normal_prompts = P.compositional_prompts(P.WINCLIP_NORMAL_STATES, P.WINCLIP_TEMPLATES, spec.object_name)
        anomalous_prompts = P.compositional_prompts(anomalous, P.WINCLIP_TEMPLATES, spec.object_name)
        return torch.stack([
            P.class_prototype(self.backbone.encode_text(normal_prompts)),
            P.class_prototype(self.backbone.encode_text(anomalous_prompts)),
        ])

    def _memory_request(self) -> FeatureRequest:
        return FeatureRequest(
            windows=frozenset(self.options.window_sizes),
            patch_tokens=self.options.patch_feature == "ln_post",
            patch_embeddings=self.options.patch_feature == "proj",
            blocks=frozenset({len(self.backbone.visual.transformer.resblocks) - 1})
            if self.options.patch_feature == "raw" else frozenset(),
        )

    def _patch_features(self, features: Features) -> torch.Tensor:
        if self.options.patch_feature == "ln_post":
            return features.patch_tokens
        if self.options.patch_feature == "proj":
            return features.patch_embeddings
        return features.blocks[max(features.blocks)]

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        tensors = {"text_prototypes": self._text_prototypes(spec)}
        feats = self.reference_features(references, self._memory_request())
        if feats is not None:
            for k in self.options.window_sizes:
                tensors[f"memory_window_{k}"] = F.normalize(feats.windows[k].reshape(-1, feats.windows[k].shape[-1]),
                                                            dim=-1)
            patches = self._patch_features(feats)
            tensors["memory_patch"] = F.normalize(patches.reshape(-1, patches.shape[-1]), dim=-1)
        meta = {"object_name": spec.object_name, "defect_words": list(spec.defect_words),
                "shots": len(references)}
        return ProductState(self.name, tensors, meta)

    def feature_request(self, state: ProductState) -> FeatureRequest:
        if state.meta.get("shots", 0) > 0:
            return self._memory_request()
        return FeatureRequest(windows=frozenset(self.options.window_sizes))

    # ------------------------------------------------------------------ scoring
    def _logit_scale(self) -> float:
        return self.options.logit_scale or self.backbone.logit_scale

    def zero_shot(self, features: Features, state: ProductState) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [N], patch-level language-guided map [N, L])."""
        prototypes = state.tensors["text_prototypes"]
        scale = self._logit_scale()
        image_scores = P.two_class_anomaly_score(features.image_embeddings, prototypes, scale)
        eps = self.options.eps
        scale_maps = []
        for k in self.options.window_sizes:
            window_scores = P.two_class_anomaly_score(features.windows[k], prototypes, scale)
            coverage = window_coverage(*features.grid, k, str(window_scores.device))
            scale_maps.append(harmonic_window_to_patch(window_scores, coverage, eps))
        if self.options.use_image_scale:
            scale_maps.append(image_scores[:, None].expand_as(scale_maps[0]))
        return image_scores, harmonic_mean(scale_maps, eps)

    def few_shot_map(self, features: Features, state: ProductState) -> torch.Tensor:
        """M^W = mean of the patch, small-window and mid-window association maps: [N, L]."""
        eps = self.options.eps
        maps = [association_min_distance(self._patch_features(features), state.tensors["memory_patch"])]
        for k in self.options.window_sizes:
            distances = association_min_distance(features.windows[k], state.tensors[f"memory_window_{k}"])
            coverage = window_coverage(*features.grid, k, str(distances.device))
            maps.append(harmonic_window_to_patch(distances, coverage, eps))
        return torch.stack(maps).mean(dim=0)

    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        image_scores, patch_map = self.zero_shot(features, state)
        if "memory_patch" in state.tensors:
            visual = self.few_shot_map(features, state)
            w = self.options.language_weight
            patch_map = w * patch_map + (1.0 - w) * visual
            image_scores = 0.5 * (image_scores + visual.max(dim=1).values)
        return DetectorOutput(image_scores, self.to_pixels(patch_map, features.grid))

    def to_pixels(self, patch_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = self.input_spec().size  # the maps cover one model input (tile), whatever its size
        grid_maps = patch_map.reshape(-1, 1, *grid)
        mode = self.options.upsample
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(grid_maps, size=(size, size), mode=mode, **kwargs)[:, 0]
