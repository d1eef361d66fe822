"""APRIL-GAN's stage adapters: one linear map per stage from a block's patch tokens into CLIP's joint space.

Also what the adapters file (a learned-part artifact) holds: the weights, the stage layers, the dims,
the input size they were trained at, the training data summary and the loss curve. The stage maths
(`stage_logits`, `stage_maps`) is shared by training and scoring, so both compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inspectd.detectors import fused
from inspectd.detectors.artifacts import LEARNED, Artifact, ArtifactMismatch, check_backbone, load_artifact

APRILGAN_VERSION = 1
REFIT_HINT = "train adapters for this CLIP with `inspectd fit aprilgan --out FILE`"
PAPER_ARCH = "ViT-L-14-336"
PAPER_IMAGE_SIZE = 518


def default_stages(depth: int, n_stages: int = 4) -> tuple[int, ...]:
    """0-based blocks ending each of ``n_stages`` equal stages: 24 blocks -> (5, 11, 17, 23), the report's layers
    6/12/18/24; 12 -> (2, 5, 8, 11); a tower shallower than ``n_stages`` gets one stage per block."""
    n = min(n_stages, depth)
    return tuple(sorted({round(depth * (i + 1) / n) - 1 for i in range(n)}))


def default_image_size(arch: str, model_size: int) -> int:
    """The report's 518 px for its ViT-L-14-336; other models run at their own input size."""
    return PAPER_IMAGE_SIZE if arch.startswith(PAPER_ARCH) else model_size


class StageAdapters(nn.Module):
    """k_n F + b_n per stage: [N, L, width] patch tokens -> [N, L, embed_dim]."""

    def __init__(self, width: int, embed_dim: int, n_stages: int) -> None:
        super().__init__()
        self.width, self.embed_dim = width, embed_dim
        self.stages = nn.ModuleList([nn.Linear(width, embed_dim) for _ in range(n_stages)])

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tokens) != len(self.stages):
            raise ValueError(f"{len(tokens)} stage token sets for {len(self.stages)} adapters")
        return [layer(t) for layer, t in zip(self.stages, tokens, strict=True)]


def stage_logits(adapted: torch.Tensor, text: torch.Tensor, logit_scale: float, grid: tuple[int, int]) -> torch.Tensor:
    """Two-class logits on the patch grid: [N, 2, gh, gw] from adapted tokens [N, L, D] and text [2, D]."""
    logits = logit_scale * (F.normalize(adapted, dim=-1) @ text.T)  # [N, L, 2]
    return logits.permute(0, 2, 1).reshape(adapted.shape[0], 2, *grid)


def batched_stage_logits(adapted: torch.Tensor, texts: torch.Tensor, logit_scale: float, grid: tuple[int, int]
                         ) -> torch.Tensor:
    """`stage_logits` with each row's own text [N, 2, D] (training batches mix categories): [N, 2, gh, gw]."""
    logits = logit_scale * torch.einsum("nld,ncd->ncl", F.normalize(adapted, dim=-1), texts)
    return logits.reshape(adapted.shape[0], 2, *grid)


def stage_probabilities(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Upsample [N, 2, gh, gw] logits to size x size (bilinear, corners aligned, as the official code), then the
    softmax over the two classes: [N, 2, S, S]."""
    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
    return torch.softmax(up, dim=1)


class AdapterBundle:
    """Loaded adapters and what they were trained with."""

    def __init__(self, module: StageAdapters, stages: tuple[int, ...], image_size: int, artifact: Artifact) -> None:
        self.module = module
        self.stages = stages
        self.image_size = image_size
        self.artifact = artifact
        self._packed: tuple[tuple, list[fused.PackedLinear]] | None = None  # ((id, version) per parameter, layers)

    def adapt(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The adapters on each stage's tokens (`StageAdapters.forward`); scoring on a CPU without gradients runs
        them as oneDNN linears with the weights packed once (2.4x MKL's rate at 896 -> 640)."""
        packed = self._packed_layers(tokens)
        if packed is None:
            return self.module(tokens)
        if len(tokens) != len(packed):
            raise ValueError(f"{len(tokens)} stage token sets for {len(packed)} adapters")
        return [layer(t.contiguous()) for layer, t in zip(packed, tokens, strict=True)]

    def _packed_layers(self, tokens: Sequence[torch.Tensor]) -> list[fused.PackedLinear] | None:
        layers = list(self.module.stages)
        weights = [layer.weight for layer in layers]
        if torch.is_grad_enabled() or not fused.available() or any(
                w.device.type != "cpu" or w.dtype != torch.float32 for w in weights) or any(
                t.device.type != "cpu" or t.dtype != torch.float32 for t in tokens):
            return None
        params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        versions = tuple((id(p), fused.source_version(p)) for p in params)
        if self._packed is None or self._packed[0] != versions:
            self._packed = (versions, [fused.pack_linear(layer) for layer in layers])
        return self._packed[1]

    @property
    def content_hash(self) -> str:
        return self.artifact.content_hash


def adapters_artifact(module: StageAdapters, stages: Sequence[int], image_size: int, backbone_identity: dict,
                      config: dict[str, Any], training: dict[str, Any]) -> Artifact:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return Artifact(kind=LEARNED, detector="aprilgan", detector_version=APRILGAN_VERSION, tensors=tensors,
                    backbone=dict(backbone_identity),
                    config={"stages": list(stages), "width": module.width, "embed_dim": module.embed_dim,
                            "image_size": image_size, **config},
                    training=training)


def load_adapters(path: str | Path, backbone: Any) -> AdapterBundle:
    """Read an adapters artifact; refuse one trained for another CLIP, tower depth or detector version."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no APRIL-GAN adapters file {path}; {REFIT_HINT}")
    artifact = load_artifact(path, kind=LEARNED, detector="aprilgan", detector_version=APRILGAN_VERSION,
                             refit_hint=REFIT_HINT)
    check_backbone(artifact.backbone, backbone.identity, where=f"APRIL-GAN adapters {path}", hint=REFIT_HINT)
    cfg = artifact.config
    stages = tuple(int(s) for s in cfg["stages"])
    depth = len(backbone.visual.transformer.resblocks)
    if max(stages) >= depth or int(cfg["width"]) != backbone.width or int(cfg["embed_dim"]) != backbone.embed_dim:
        raise ArtifactMismatch(f"APRIL-GAN adapters {path}: stages {list(stages)}, width {cfg['width']}, embed dim "
                               f"{cfg['embed_dim']} do not fit this tower ({depth} blocks, width {backbone.width}, "
                               f"embed dim {backbone.embed_dim}); {REFIT_HINT}")
    module = StageAdapters(int(cfg["width"]), int(cfg["embed_dim"]), len(stages))
    module.load_state_dict(artifact.tensors)
    module.to(backbone.device).eval().requires_grad_(False)
    return AdapterBundle(module, stages, int(cfg["image_size"]), artifact)
