"""Random-word FFN detector (spec: shared/spec/randword.md): s_FNN, + prompt score s_p, + few-shot s_img.

Image level only. The FFN comes from `inspectd fit randword` and is copied into each product state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from inspectd.detectors import prompts as P
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features
from inspectd.detectors.base import Detector, DetectorOutput, ProductSpec, ProductState, register_detector
from inspectd.detectors.memory import association_min_distance
from inspectd.detectors.training.randword_ffn import RandWordFFN, check_backbone, load_ffn
from inspectd.detectors.weights import sha256_of

FFN_PREFIX = "ffn."


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


@register_detector
class RandWord(Detector):
    """score = [s_p] + [s_FNN] + [s_img (k >= 1)], each term switchable; image level only (maps=None)."""

    name = "randword"
    Options = RandWordOptions
    produces_masks = False

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        if not (self.options.use_ffn or self.options.use_prompt_score):
            raise ValueError("detector 'randword' options: use_ffn and use_prompt_score are both false; "
                             "nothing would score a zero-shot frame")
        if self.options.temperature <= 0:
            raise ValueError(f"detector 'randword' options.temperature must be > 0, got {self.options.temperature}")
        self._templates: dict[tuple[int, tuple[int, ...], float], RandWordFFN] = {}

    # ------------------------------------------------------------------ building a product state
    def _ffn_path(self) -> Path:
        if not self.options.ffn:
            raise ValueError("detector 'randword' needs option `ffn`: the FFN file written by "
                             "`inspectd fit randword --out FILE` with this product's CLIP model "
                             "(or set use_ffn: false for the prompt-only CLIP baseline)")
        return Path(self.options.ffn).expanduser()

    def prompt_texts(self, spec: ProductSpec) -> list[str]:
        """The spec's two prompts: "a photo of [n] object" and "a photo of [a] object"."""
        obj = spec.object_name if self.options.known_object else self.options.object_word
        return [" ".join(f"a photo of {word} {obj}".split())
                for word in (self.options.normal_word, self.options.anomaly_word)]

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray]) -> ProductState:
        texts = self.prompt_texts(spec)
        tensors = {"text_prototypes": F.normalize(self.backbone.encode_text(texts), dim=-1)}
        meta: dict[str, Any] = {"object_name": spec.object_name, "prompts": texts, "shots": len(references)}
        if self.options.use_ffn:
            path = self._ffn_path()
            bundle = load_ffn(path, self.backbone)
            for key, value in bundle.model.state_dict().items():
                tensors[FFN_PREFIX + key] = value.detach().clone()
            meta["ffn"] = {"path": str(path), "sha256": sha256_of(path), "arch": bundle.arch,
                           "pretrained": bundle.pretrained,
                           "embed_dim": bundle.embed_dim, "hidden": list(bundle.model.hidden),
                           "dropout": bundle.model.dropout, "pairs": bundle.train.pairs, "seed": bundle.train.seed,
                           "words": [bundle.prompts.normal_word, bundle.prompts.anomaly_word,
                                     bundle.prompts.object_word]}
        feats = self.reference_features(references, FeatureRequest())
        if feats is not None:
            tensors["memory_image"] = F.normalize(feats.image_embeddings, dim=-1)
        return ProductState(self.name, tensors, meta)

    def feature_request(self, state: ProductState) -> FeatureRequest:
        return FeatureRequest()  # the image embedding is always computed

    def config_fingerprint(self) -> str:
        """Options + backbone, and the FFN file's content (a retrained FFN at the same path refits)."""
        base = super().config_fingerprint()
        if not (self.options.use_ffn and self.options.ffn):
            return base
        path = Path(self.options.ffn).expanduser()
        content = sha256_of(path) if path.is_file() else "missing"
        return hashlib.sha256(f"{base}:{content}".encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ scoring
    def _ffn_scores(self, embeddings: torch.Tensor, state: ProductState) -> torch.Tensor:
        ffn = state.meta.get("ffn")
        params = {k[len(FFN_PREFIX):]: v for k, v in state.tensors.items() if k.startswith(FFN_PREFIX)}
        if not ffn or not params:
            raise ValueError("detector 'randword': this product state has no FFN (fitted without the `ffn` "
                             "option); set `ffn` to a file from `inspectd fit randword` and rebuild the state")
        check_backbone(ffn["arch"], ffn["pretrained"], int(ffn["embed_dim"]), self.backbone,
                       where=f"the FFN in this product state ({ffn['path']})")
        key = (int(ffn["embed_dim"]), tuple(ffn["hidden"]), float(ffn["dropout"]))
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = RandWordFFN(*key).eval()  # eval: BatchNorm running stats
        with torch.inference_mode():
            return torch.sigmoid(functional_call(template, params, (embeddings,)))

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
