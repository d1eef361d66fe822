"""Random-word FFN detector (spec: shared/spec/randword.md): s_FNN, + prompt score s_p, + few-shot s_img.

Image level only. The FFN is its offline-learned part (`Learning(offline=RandWordTrainer)`, trained by
`inspectd fit randword`, a learned-part artifact the product's ``ffn`` option names). The detector
loads it once, when the product is built; a product state records which FFN (content hash) it was fitted with.
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

from inspectd.detectors import prompts as P
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features
from inspectd.detectors.base import (
    Detector,
    DetectorOutput,
    Learning,
    ProductSpec,
    ProductState,
    check_multi_crop,
    register_detector,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.memory import association_min_distance
from inspectd.detectors.training.randword_ffn import RANDWORD_VERSION, FfnBundle, RandWordTrainer, load_ffn


@dataclass(frozen=True)
class RandWordOptions:
    ffn: str = ""  # FFN file from `inspectd fit randword` (required unless use_ffn is false)
    use_ffn: bool = True  # s_FNN = sigmoid(FFN(e_img / |e_img|))
    use_prompt_score: bool = True  # s_p, the two-prompt CLIP score ("CLIP + ours")
    use_reference_score: bool = True  # s_img with k >= 1 references (few-shot)
    normal_word: str = "a"
    anomaly_word: str = "a damaged"
    object_word: str = "object"  # s_p prompts' object word when known_object is false
    known_object: bool = False  # s_p prompts name the product's object instead ("object known")
    temperature: float = 0.01  # T of s_p
    multi_crop: int = 5  # test-time multi-crop (spec: on by default): image score averaged over the full view
    #                      and this many 80 % crops (centre, 4 corners); 0 = off (the paper's "no multi-crop")

    def __post_init__(self) -> None:  # here, so `inspectd check` / `product put` reject what a build would
        if not (self.use_ffn or self.use_prompt_score):
            raise ValueError("detector 'randword' options: use_ffn and use_prompt_score are both false; "
                             "nothing would score a zero-shot frame")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"detector 'randword' options.temperature must be > 0, got {self.temperature}")
        check_multi_crop("detector 'randword' options", self.multi_crop)


@register_detector
class RandWord(Detector):
    """score = [s_p] + [s_FNN] + [s_img (k >= 1)], each term switchable; image level only (maps=None)."""

    name = "randword"
    version = RANDWORD_VERSION
    Options = RandWordOptions
    produces_masks = False
    learning = Learning(per_product="fitted", offline=RandWordTrainer)
    artifact_options = ("ffn",)

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        self._bundle: FfnBundle | None = None

    # ------------------------------------------------------------------ building a product state
    def ffn(self) -> FfnBundle:
        """The FFN artifact named by the ``ffn`` option, loaded once (checked against this backbone)."""
        if self._bundle is None:
            if not self.options.ffn:
                raise ValueError("detector 'randword' needs option `ffn`: the FFN file written by "
                                 "`inspectd fit randword --out FILE` with this product's CLIP model "
                                 "(or set use_ffn: false for the prompt-only CLIP baseline)")
            bundle = load_ffn(Path(self.options.ffn).expanduser(), self.backbone)
            bundle.model.to(self.backbone.device).eval()
            self._bundle = bundle
        return self._bundle

    def load_learned(self) -> None:
        if self.options.use_ffn and self.options.ffn:
            self.ffn()

    def loaded_hash(self, option: str) -> str | None:
        return self._bundle.content_hash if option == "ffn" and self._bundle is not None else None

    def prompt_texts(self, spec: ProductSpec) -> list[str]:
        """The spec's two prompts: "a photo of [n] object" and "a photo of [a] object"."""
        obj = spec.object_name if self.options.known_object else self.options.object_word
        return [" ".join(f"a photo of {word} {obj}".split())
                for word in (self.options.normal_word, self.options.anomaly_word)]

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        texts = self.prompt_texts(spec)
        tensors = {"text_prototypes": F.normalize(self.backbone.encode_text(texts), dim=-1)}
        meta: dict[str, Any] = {"object_name": spec.object_name, "prompts": texts, "shots": len(references)}
        if self.options.use_ffn:
            bundle = self.ffn()
            meta["ffn"] = {"path": str(self.options.ffn), "sha256": bundle.content_hash, "arch": bundle.arch,
                           "pretrained": bundle.pretrained, "embed_dim": bundle.embed_dim,
                           "hidden": list(bundle.model.hidden), "dropout": bundle.model.dropout,
                           "pairs": bundle.train.pairs, "seed": bundle.train.seed,
                           "words": [bundle.prompts.normal_word, bundle.prompts.anomaly_word,
                                     bundle.prompts.object_word]}
        feats = self.reference_features(references, FeatureRequest())
        if feats is not None:
            tensors["memory_image"] = F.normalize(feats.image_embeddings, dim=-1)
        return ProductState(self.name, tensors, meta)

    def feature_request(self, state: ProductState) -> FeatureRequest:
        return FeatureRequest()  # the image embedding is always computed

    # ------------------------------------------------------------------ scoring
    def _ffn_scores(self, embeddings: torch.Tensor, state: ProductState) -> torch.Tensor:
        recorded = state.meta.get("ffn")
        if not recorded:
            raise ValueError("detector 'randword': this product state has no FFN (fitted without the `ffn` "
                             "option); set `ffn` to a file from `inspectd fit randword` and rebuild the state")
        bundle = self.ffn()
        if recorded.get("sha256") != bundle.content_hash:
            raise ValueError(f"detector 'randword': the product state was fitted with FFN {recorded.get('path')} "
                             f"(sha256 {str(recorded.get('sha256'))[:12]}) but the detector loaded "
                             f"{self.options.ffn} (sha256 {bundle.content_hash[:12]}); rebuild the product")
        with torch.inference_mode():
            return torch.sigmoid(bundle.model(embeddings))

    def components(self, features: Features, state: ProductState) -> dict[str, torch.Tensor]:
        """Each enabled term per row: "prompt" (s_p), "ffn" (s_FNN), "reference" (s_img, few-shot)."""
        e = F.normalize(features.image_embeddings.float(), dim=-1)
        out: dict[str, torch.Tensor] = {}
        if self.options.use_prompt_score:
            out["prompt"] = P.two_class_anomaly_score(e, state.tensors["text_prototypes"],
                                                      1.0 / self.options.temperature)
        if self.options.use_ffn:
            out["ffn"] = self._ffn_scores(e, state)
        if self.options.use_reference_score and "memory_image" in state.tensors:
            # WinCLIP+-style image-level association: min over references of 1/2 (1 - cos).
            out["reference"] = association_min_distance(e, state.tensors["memory_image"])
        return out

    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        parts = self.components(features, state)
        return DetectorOutput(torch.stack(list(parts.values())).sum(dim=0), None)
