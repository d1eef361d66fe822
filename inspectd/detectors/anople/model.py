"""AnoPLe's learned part: textual and visual deep prompts, their bidirectional coupling, the view tokens and the
lightweight decoder (one `AnoPleModel`, shared by all products in the multi-class setting), and its artifact.

Shapes (spec §2.3-2.7): ``text_ctx`` [J, C_t, W_t], ``visual_ctx`` [J, C_v, W_v], ``f_{t→v}`` W_t → W_v and
``f_{v→t}`` W_v → W_t (one linear map with bias per direction, shared by all J layers: the paper's notation;
``per_layer_coupling`` gives each layer its own pair, as MaPLe),
``view_tokens`` [N + 1, W_v] (c₁..c₄ for the crops, the last for the full view), and the decoder (bilinear
upsampling of the final patch tokens, then conv3×3 → GELU → conv3×3 → GELU → conv1×1 to the joint dimension D;
no BatchNorm: its statistics over batches of one image's views would differ between training and scoring).
Text prompts use the differentiable text path of the shared backbone (``encode_text_embeddings`` with
per-layer deep prompts) and PromptAD's placeholder layout (``[SOS][N × (C_t + C_v)] {words} .[EOS]``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inspectd.detectors import artifacts
from inspectd.detectors.promptad.prompts import _check_placeholders

ANOPLE_VERSION = 2  # 2: class words are the real class names ("pcb4"), not PromptAD's mapping
ABNORMAL_WORD = "abnormal"  # the only anomaly word of the method (spec §1)


def scaled_layers(depth: int, layers: Sequence[int]) -> tuple[int, ...]:
    """Paper layers (1-based, of 12) scaled to a tower of ``depth`` blocks as ceil(depth · l / 12)."""
    return tuple(sorted({min(depth, max(1, -(-depth * layer // 12))) for layer in layers}))


@dataclass(frozen=True)
class Architecture:
    """What the learned part's shapes depend on (recorded in the artifact)."""

    text_ctx: int = 3  # C_t (MVTec; VisA: 5)
    visual_ctx: int = 3  # C_v (MVTec; VisA: 8)
    prompt_depth: int = 0  # J; 0 = 9 of 12 layers scaled to the shallower tower
    crops: int = 4  # N crop views (2 x 2 grid of the 2S resize); the full view's token is the last
    decoder_size: int = 0  # side of the decoder's output map; 0 = 2 x the patch grid
    decoder_width: int = 0  # hidden channels; 0 = the joint dimension D
    per_layer_coupling: bool = False  # one f_{t→v}, f_{v→t} pair per prompted layer (MaPLe) instead of shared
    view_token_every_layer: bool = False  # re-insert c_i at every prompted layer (default: at the input only)

    def resolve(self, backbone: Any) -> Architecture:
        """Defaults filled in for ``backbone``."""
        depth = min(len(backbone.visual.transformer.resblocks), len(backbone.model.transformer.resblocks))
        j = self.prompt_depth or scaled_layers(depth, (9,))[0]
        if not 1 <= j <= depth:
            raise ValueError(f"prompt_depth {j} must be within 1..{depth}")
        if min(self.text_ctx, self.visual_ctx) < 1 or self.crops != 4:
            raise ValueError("text_ctx and visual_ctx must be >= 1, and crops is the spec's 2 x 2 grid (4)")
        return dataclasses.replace(self, prompt_depth=j, decoder_size=self.decoder_size or 2 * backbone.grid[0],
                                   decoder_width=self.decoder_width or backbone.embed_dim)


class Decoder(nn.Module):
    """Patch tokens [N, L, W] on a grid -> dense features [N, D, size, size] (spec §2.7)."""

    def __init__(self, width: int, embed_dim: int, hidden: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(width, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, embed_dim, 1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class AnoPleModel(nn.Module):
    """Prompts, couplings, view tokens and decoder; the CLIP towers are not part of it (frozen, outside)."""

    def __init__(self, backbone: Any, arch: Architecture, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.arch = arch = arch.resolve(backbone)
        text_width = int(backbone.model.token_embedding.weight.shape[1])
        width, j = backbone.width, arch.prompt_depth
        self.text_ctx = nn.Parameter(0.02 * torch.randn(j, arch.text_ctx, text_width, generator=generator))
        self.visual_ctx = nn.Parameter(0.02 * torch.randn(j, arch.visual_ctx, width, generator=generator))
        self.view_tokens = nn.Parameter(0.02 * torch.randn(arch.crops + 1, width, generator=generator))
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(1 << 31, (1,), generator=generator)))
            self.t2v = _coupling(text_width, width, j if arch.per_layer_coupling else 0)
            self.v2t = _coupling(width, text_width, j if arch.per_layer_coupling else 0)
            self.decoder = Decoder(width, backbone.embed_dim, arch.decoder_width, arch.decoder_size)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def full_view(self) -> int:
        return self.arch.crops

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The prompt learner's tensors (lr 1e-3 in the spec), i.e. everything but the decoder."""
        return [self.text_ctx, self.visual_ctx, self.view_tokens, *self.t2v.parameters(), *self.v2t.parameters()]

    def visual_prompts(self) -> torch.Tensor:
        """[J, C_v + C_t, W_v]: each layer's own visual context, then its text context mapped by f_{t→v}."""
        return torch.cat([self.visual_ctx, _couple(self.t2v, self.text_ctx)], dim=1)

    def text_prompts(self) -> torch.Tensor:
        """[J, C_t + C_v, W_t]: each layer's own text context, then its visual context mapped by f_{v→t}."""
        return torch.cat([self.text_ctx, _couple(self.v2t, self.visual_ctx)], dim=1)

    def row_inputs(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tower inputs for rows with view indices ``views`` [N] (0..3 crops, 4 the full view)."""
        prompts = self.visual_prompts()
        view = self.view_tokens[views]
        if self.arch.view_token_every_layer:
            view = view[:, None].expand(-1, self.arch.prompt_depth, -1)
        return {"anople_prompts": prompts[None].expand(views.shape[0], -1, -1, -1), "anople_view": view}

    def full_view_token(self) -> torch.Tensor:
        """c_{N+1}, the only view token used at test time: [W], or [J, W] when re-inserted at every layer."""
        return self.row_inputs(torch.tensor([self.full_view], device=self.view_tokens.device))["anople_view"][0]

    def _texts(self, backbone: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [2, T, W], EOT [2]) of the normal and abnormal prompt of a class (cached)."""
        if name not in self._tokens:
            n = self.arch.text_ctx + self.arch.visual_ctx
            prefix = " ".join(["N"] * n)
            tokens, embeddings = backbone.tokenize([f"{prefix} {name}.", f"{prefix} {ABNORMAL_WORD} {name}."])
            _check_placeholders(backbone, tokens, n)
            self._tokens[name] = (embeddings.float(), tokens.argmax(dim=-1))
        return self._tokens[name]

    def text_features(self, backbone: Any, names: Sequence[str]) -> torch.Tensor:
        """[len(names), 2, D] L2-normalised (w⁺, w⁻) per class name, in one differentiable text-tower pass."""
        prompts = self.text_prompts()
        n = prompts.shape[1]
        parts = [self._texts(backbone, name) for name in names]
        embeddings = torch.cat([p[0] for p in parts]).to(prompts.device)
        eot = torch.cat([p[1] for p in parts])
        ctx = prompts[0].to(embeddings.dtype)[None].expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + n:]], dim=1)
        deep = [None, *prompts[1:]]
        features = backbone.encode_text_embeddings(embeddings, eot, deep_prompts=deep)
        return F.normalize(features, dim=-1).reshape(len(names), 2, -1)


def _coupling(source: int, target: int, layers: int) -> nn.Module:
    """One linear map shared by every layer (``layers`` = 0), or one per layer."""
    if not layers:
        return nn.Linear(source, target)
    return nn.ModuleList([nn.Linear(source, target) for _ in range(layers)])


def _couple(maps: nn.Module, ctx: torch.Tensor) -> torch.Tensor:
    """Map each layer's context [J, C, W] with the shared map or with that layer's own."""
    if isinstance(maps, nn.Linear):
        return maps(ctx)
    return torch.stack([layer_map(layer_ctx) for layer_map, layer_ctx in zip(maps, ctx, strict=True)])


def class_word(product: str, object_name: str) -> str:
    """The class word of the prompts: the real class name (spec §2.3: "hazelnut", "pcb4"), i.e. the product's object
    name (eval's default: the category folder's name, underscores as spaces); not PromptAD's mapping of the VisA
    PCBs to one "printed circuit board", which would give the four classes one prototype."""
    return object_name.strip() or product


def model_artifact(model: AnoPleModel, backbone: Any, config: Mapping[str, Any],
                   training: Mapping[str, Any]) -> artifacts.Artifact:
    tensors = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return artifacts.Artifact(artifacts.LEARNED, "anople", ANOPLE_VERSION, tensors, backbone=backbone.identity,
                              config={"architecture": dataclasses.asdict(model.arch), **config},
                              training=dict(training))


def load_model(path: str | Path, backbone: Any) -> tuple[AnoPleModel, artifacts.Artifact]:
    """The multi-class model a product points to (checked against the backbone), in eval mode without grads."""
    artifact = artifacts.load_artifact(path, backbone.device, kind=artifacts.LEARNED, detector="anople",
                                       detector_version=ANOPLE_VERSION, backbone=backbone.identity,
                                       refit_hint="re-run `inspectd fit anople --out FILE` with this CLIP")
    model = AnoPleModel(backbone, Architecture(**artifact.config["architecture"])).to(backbone.device)
    model.load_state_dict(artifact.tensors)
    model.eval().requires_grad_(False)
    return model, artifact


_SHARED: OrderedDict[tuple[str, int, int, int], tuple[AnoPleModel, artifacts.Artifact]] = OrderedDict()
_SHARED_LOCK = threading.Lock()
SHARED_MODELS = 8  # loaded multi-class models kept (LRU)


def shared_model(path: str | Path, backbone: Any) -> tuple[AnoPleModel, artifacts.Artifact]:
    """`load_model`, loaded once for all the products that point to the same file (keyed by the file's path, size
    and modification time, and the backbone): the multi-class model is one object, however many products use it."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat() if resolved.is_file() else None
    key = (str(resolved), stat.st_mtime_ns if stat else -1, stat.st_size if stat else -1, id(backbone))
    with _SHARED_LOCK:
        if key in _SHARED:
            _SHARED.move_to_end(key)
            return _SHARED[key]
    loaded = load_model(resolved, backbone)
    with _SHARED_LOCK:
        _SHARED[key] = loaded
        while len(_SHARED) > SHARED_MODELS:
            _SHARED.popitem(last=False)
    return loaded
