"""AnoPLe (arXiv 2408.13516; spec: shared/spec/anople.md): bidirectional deep prompts learned from normal images
only, a lightweight decoder and a prompted patch memory. Two detectors:

- ``anople`` (the paper's multi-class setting): one learned part (prompts, couplings, view tokens, decoder)
  shared by many products, trained offline by `inspectd fit anople` (``--products-dir`` or ``--root`` over
  several categories; `training.py`) and pointed to with ``options: {model: FILE}``; a product's fit is seconds
  (its class word's text prototypes and the memory of its k references): ``Learning("fitted", AnoPleTrainer)``.
- ``anople-star`` (AnoPLe*, one model per class): the same training on the product's own references, run in the
  background by the daemon (``Learning(per_product="trained")``); the learned tensors are saved with the product.

Scoring (spec §2.10), on one square resize at the model size through the prompted tower (`tower.py`) with the
full-view token c₅: p̂ = softmax(s·cos(z⁰, [w⁺, w⁻]))[abnormal]; M̂ = the decoder's abnormal probability,
bilinear to the input; M_mem = min over the memory of ½(1 − cos) of the patch tokens averaged over layers 7-10 of
12 (scaled to the depth; each layer L2-normalised before the mean, the mean normalised again) of the same
prompted tower, bilinear to the input; map M = 1/(1/M̂ + 1/M_mem), score = 1/(1/p̂ + 1/max M). Without memory
(``use_memory: false`` or k = 0; the paper's Table 2 setting) map = M̂ and score = p̂. The prompted tower does
not depend on the product in the multi-class model, and per-product prompts ride per row (``tower_inputs``),
so frames of any AnoPLe products share one forward per batch.

Choices where the paper is silent (options of `Recipe`, `Architecture`, `ScoringOptions` unless marked fixed):
prompts after ``ln_pre`` (fixed, as the shared prompted tower); one coupling map per direction with bias, shared
by the J layers (``per_layer_coupling``); the view token inserted at the input only (``view_token_every_layer``);
decoder conv3×3 → GELU → conv3×3 → GELU → conv1×1 on the ``ln_post`` patch tokens upsampled to 2× the grid (30²
on ViT-B-16-plus-240; structure fixed, ``decoder_size``/``decoder_width`` options), no BatchNorm; 1/τ = CLIP's
logit scale for the CE and the pixel softmax (``logit_scale``); per-class prototypes w± from the product's own
class word (reading (b) of pitfall 3; ``prototypes: dataset`` averages them over the training classes, reading
(a)); the alignment's softmax spatial over the abnormal pixel logits, τ = 2 (``align_tau``); latent noise
σ = 0.015 on the normalised embedding (``latent_sigma``); DRAEM self-texture (``texture_dir``) and
quantile-thresholded Perlin regions (``min_cover``/``max_cover``, `synthesis.py`); warm-up over 10 % of the steps,
then constant (``warmup_fraction``); no map blur (``blur_sigma``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inspectd.detectors.anople import losses as L
from inspectd.detectors.anople.model import (
    ANOPLE_VERSION,
    AnoPleModel,
    Architecture,
    Decoder,
    class_word,
    scaled_layers,
    shared_model,
)
from inspectd.detectors.anople.tower import PROMPTS, VIEW, layout_tower
from inspectd.detectors.anople.training import AnoPleTrainer, Recipe, dataset_prototypes, fit_model
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features
from inspectd.detectors.base import (
    Detector,
    DetectorOutput,
    Learning,
    ProductSpec,
    ProductState,
    check_eps,
    check_memory_layers,
    register_detector,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.memory import association_min_distance
from inspectd.detectors.pipeline import score_images
from inspectd.detectors.preprocess import InputSpec, shifted_views
from inspectd.detectors.promptad import gaussian_blur
from inspectd.detectors.promptad.tower import memory_blocks

MEMORY_LAYERS = (7, 8, 9, 10)  # 1-based, of 12 (MVTec-AD; VisA: 7-9)


@dataclass(frozen=True)
class ScoringOptions:
    use_memory: bool = True  # fuse the prompted patch memory of the k references
    memory_layers: tuple[int, ...] = ()  # 1-based blocks averaged in the memory; () = 7-10 of 12, scaled
    logit_scale: float = 0.0  # 0 = the scale the prompts were trained with
    blur_sigma: float = 0.0  # Gaussian blur of the map in input pixels (0 = none; unspecified in the paper)
    eps: float = 1e-6  # floor before the harmonic fusions

    # here, so `inspectd run --check` / `product put` reject what a build would (build_options names the detector)
    def __post_init__(self) -> None:
        where = "detector 'anople' options"
        if not (math.isfinite(self.logit_scale) and self.logit_scale >= 0):
            raise ValueError(f"{where}.logit_scale must be >= 0 (0 = the prompts' own), got {self.logit_scale}")
        check_eps(where, self.eps)
        check_memory_layers(where, self.memory_layers)


@dataclass(frozen=True)
class AnoPleOptions(ScoringOptions):
    model: str = ""  # the multi-class model from `inspectd fit anople --out FILE` (required)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("detector 'anople' options.model must name the file written by "
                             "`inspectd fit anople --out FILE` with this product's CLIP model "
                             "(or use detector 'anople-star' to train per product)")


@dataclass(frozen=True)
class AnoPleStarOptions(Recipe, ScoringOptions):
    epochs: int = 60  # over the product's k references, one image per step
    checkpoint_every: int = 1  # epochs between checkpoints of a background fit (resume after a stop)

    def __post_init__(self) -> None:  # what the training loop and the model would refuse only once a build runs
        where = "detector 'anople-star' options"
        try:
            Recipe.__post_init__(self)
        except ValueError as exc:  # (its messages start with the field)
            raise ValueError(f"{where}.{exc}") from None
        ScoringOptions.__post_init__(self)
        if self.checkpoint_every < 1:
            raise ValueError(f"{where}.checkpoint_every must be >= 1, got {self.checkpoint_every}")


class _AnoPleDetector(Detector):
    """Scoring shared by both settings; a subclass says where the prompts and decoder come from."""

    version = ANOPLE_VERSION
    produces_masks = True

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        depth = len(backbone.visual.transformer.resblocks)
        layers = tuple(self.options.memory_layers) or scaled_layers(depth, MEMORY_LAYERS)
        self.blocks = memory_blocks(depth, layers)

    def input_spec(self) -> InputSpec:
        return InputSpec(self.backbone.image_size, "square")

    def feature_request(self, state: ProductState) -> FeatureRequest:
        return self._request(state.tensors)

    def _request(self, tensors: Mapping[str, torch.Tensor]) -> FeatureRequest:
        """The prompted tower of this prompt layout, final patch tokens and (with memory) the memory taps."""
        depth, n_prompts = tensors["visual_prompts"].shape[:2]
        tower = layout_tower(depth, n_prompts, tensors["view_token"].dim() == 2)
        blocks = frozenset(self.blocks) if self.options.use_memory else frozenset()
        return FeatureRequest(tower=tower, patch_tokens=True, blocks=blocks)

    # ------------------------------------------------------------------ what a subclass provides
    def scale(self, state: ProductState) -> float:
        return self.options.logit_scale or float(state.meta["logit_scale"])

    def decoder(self, state: ProductState) -> Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ building a state
    def _state(self, model: AnoPleModel, spec: ProductSpec, references: Sequence[np.ndarray], scale: float,
               meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        word = class_word(spec.product, spec.object_name)
        with torch.no_grad():
            tensors = {"text": model.text_features(self.backbone, [word])[0].float().clone(),
                       "visual_prompts": model.visual_prompts().detach().float().clone(),
                       "view_token": model.full_view_token().detach().float().clone()}
        if references and self.options.use_memory:
            tensors["memory"] = self._memory(references, tensors)
        meta = {**meta, "object_name": spec.object_name, "class_word": word, "shots": len(references),
                "logit_scale": scale, "memory_blocks": list(self.blocks)}
        return tensors, meta

    def _memory(self, references: Sequence[np.ndarray], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pixels = torch.cat([self.preprocessor(image)[0] for image in references])
        inputs = {name: tensors[key][None].expand(len(pixels), *tensors[key].shape)
                  for name, key in ((PROMPTS, "visual_prompts"), (VIEW, "view_token"))}
        feats = self.backbone.forward(pixels, self._request(tensors), inputs)
        tokens = self.layer_mean(feats)
        return tokens.reshape(-1, tokens.shape[-1]).clone()

    def layer_mean(self, features: Features) -> torch.Tensor:
        """[N, L, W]: the normalised mean over memory layers of each layer's L2-normalised patch tokens."""
        stacked = torch.stack([F.normalize(features.blocks[b].float(), dim=-1) for b in self.blocks])
        return F.normalize(stacked.mean(dim=0), dim=-1)

    def tower_inputs(self, state: ProductState) -> dict[str, torch.Tensor]:
        return {PROMPTS: state.tensors["visual_prompts"][None], VIEW: state.tensors["view_token"][None]}

    # ------------------------------------------------------------------ scoring
    def maps(self, features: Features, state: ProductState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(p̂ [N], M̂ [N, S, S], M_mem [N, S, S] or None) of rows of ``features``."""
        n, size, scale = len(features), self.input_spec().size, self.scale(state)
        text = state.tensors["text"].float()[None].expand(n, -1, -1)
        p_img = torch.softmax(L.image_logits(features.image_embeddings.float(), text, scale), dim=-1)[:, 1]
        dense = self.decoder(state)(features.patch_tokens.float(), features.grid)
        m_hat = L.upsample(torch.softmax(L.pixel_logits(dense, text, scale), dim=1)[:, 1], size)
        if not self.options.use_memory or "memory" not in state.tensors:
            return p_img, m_hat, None
        distance = association_min_distance(self.layer_mean(features), state.tensors["memory"])
        return p_img, m_hat, L.upsample(distance.reshape(n, *features.grid), size)

    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        eps = self.options.eps
        with torch.inference_mode():
            p_img, m_hat, m_mem = self.maps(features, state)
            if m_mem is None:
                return DetectorOutput(p_img, gaussian_blur(m_hat, self.options.blur_sigma))
            fused = 1.0 / (1.0 / m_hat.clamp_min(eps) + 1.0 / m_mem.clamp_min(eps))
            peak = fused.flatten(1).max(dim=1).values
            image = 1.0 / (1.0 / p_img.clamp_min(eps) + 1.0 / peak.clamp_min(eps))
            return DetectorOutput(image, gaussian_blur(fused, self.options.blur_sigma))


@register_detector
class AnoPle(_AnoPleDetector):
    """AnoPLe, multi-class: the shared learned part from a file, per-product prototypes and memory."""

    name = "anople"
    Options = AnoPleOptions
    learning = Learning(per_product="fitted", offline=AnoPleTrainer)
    artifact_options = ("model",)

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        self._loaded: tuple[AnoPleModel, Any] | None = None

    @property
    def model(self) -> AnoPleModel:
        if self._loaded is None:
            self._loaded = shared_model(self.options.model, self.backbone)
        return self._loaded[0]

    @property
    def model_hash(self) -> str:
        _ = self.model
        return self._loaded[1].content_hash

    def load_learned(self) -> None:
        _ = self.model

    def loaded_hash(self, option: str) -> str | None:
        return self._loaded[1].content_hash if option == "model" and self._loaded is not None else None

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        model, config = self.model, self._loaded[1].config
        tensors, meta = self._state(model, spec, references, float(config["logit_scale"]),
                                    {"model_sha256": self.model_hash})
        if config.get("prototypes") == "dataset":  # the classes the model was trained on, not the product's own
            with torch.no_grad():
                tensors["text"] = dataset_prototypes(model.text_features(self.backbone, config["classes"])).clone()
            meta["prototype_classes"] = list(config["classes"])
        return ProductState(self.name, tensors, meta)

    def decoder(self, state: ProductState) -> Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]:
        if state.meta.get("model_sha256") != self.model_hash:
            raise ValueError("detector 'anople': the product state was fitted with another model file "
                             f"(sha256 {str(state.meta.get('model_sha256'))[:12]}) than the one loaded "
                             f"({self.model_hash[:12]}); rebuild the product")
        return self.model.decoder


@register_detector
class AnoPleStar(_AnoPleDetector):
    """AnoPLe*: the whole learned part trained per product on its own references, in the background."""

    name = "anople-star"
    Options = AnoPleStarOptions
    learning = Learning(per_product="trained")

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, options)
        arch: Architecture = self.options.architecture().resolve(backbone)
        with torch.device("meta"):  # structure only: every call passes the product's own decoder weights
            self._template = Decoder(backbone.width, backbone.embed_dim, arch.decoder_width, arch.decoder_size)

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        ctx = ctx or FitContext()
        if not references:
            raise ValueError("detector 'anople-star' learns from normal images: it needs k >= 1 references")
        checkpoint = None if ctx.checkpoint_dir is None else ctx.checkpoint_dir / "loop.safetensors"
        word = class_word(spec.product, spec.object_name)
        model, result = fit_model(self.backbone, [(word, image) for image in references], self.options, ctx.seed,
                                  progress=ctx.section(0.0, 0.95), checkpoint=checkpoint,
                                  checkpoint_every=self.options.checkpoint_every)
        if result.stopped:
            ctx.check_stop()
        scale = self.options.logit_scale or self.backbone.logit_scale
        tensors, meta = self._state(model, spec, references, scale,
                                    {"seed": ctx.seed, "history": result.history,
                                     "resumed_from_epoch": result.resumed_from_epoch,
                                     "steps_run": sum(int(r["steps"]) for r in result.history)})
        tensors.update({f"model/{k}": v.detach().float().clone() for k, v in model.state_dict().items()})
        return ProductState(self.name, tensors, meta)

    def decoder(self, state: ProductState) -> Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]:
        params = {k[len("model/decoder."):]: v for k, v in state.tensors.items() if k.startswith("model/decoder.")}

        def run(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            return torch.func.functional_call(self._template, params, (tokens, grid))

        return run

    def calibration_scores(self, spec: ProductSpec, references: Sequence[np.ndarray], state: ProductState,
                           ctx: FitContext, has_holdout: bool) -> dict[str, list[float]]:
        """Shifted views of every reference against the trained state (as PromptAD: no k re-trainings)."""
        views = [view for image in references for view in shifted_views(image)]
        ctx.check_stop()
        scores = score_images(self, state, views)
        ctx.progress(1.0, "calibrated on shifted views")
        return {"shifted_views": scores}
