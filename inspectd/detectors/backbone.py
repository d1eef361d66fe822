"""The one CLIP backbone every detector shares: loading, devices, feature taps, window embeddings, text.

`ClipBackbone.forward` runs the image tower once for a batch and returns every feature any
detector of the batch asked for (`FeatureRequest`): the image embedding, patch tokens of chosen
blocks, and WinCLIP window embeddings computed by token dropping (all windows of all images in one
transformer batch per window size).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from inspectd.detectors import fused
from inspectd.detectors import weights as weights_mod
from inspectd.detectors.preprocess import Preprocessor

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "DEMO MODE: CLIP runs with RANDOM weights; every score, verdict and table is MEANINGLESS. "
    "Get real weights with `inspectd weights fetch` (see README)."
)


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load and how to run it."""

    arch: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e31"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    precision: str = "auto"  # "auto" (fp32 on CPU, fp16 on CUDA) | "fp32" | "fp16" | "bf16"
    quick_gelu: str = "auto"  # "auto" | "true" | "false"  (OpenAI checkpoints were trained with QuickGELU)
    threads: int = 0  # torch intra-op threads on CPU; 0 = all cores
    cache_dir: str | None = None
    demo: bool = False  # allow pretrained="random" (loudly meaningless)
    window_chunk_tokens: int = 0  # tokens per window-pass chunk; 0 = auto (CPU: 2048, cache-sized, ~20% faster)
    cpu_kernels: str = "auto"  # "auto" (oneDNN fused blocks when the tower allows) | "onednn" (required) | "torch"

    @property
    def model_id(self) -> str:
        return f"{self.arch}/{self.pretrained}"


@dataclass(frozen=True)
class FeatureRequest:
    """The feature taps a detector needs; requests of a batch's detectors are merged with `|`."""

    blocks: frozenset[int] = frozenset()  # raw patch tokens after these blocks (0-based)
    patch_tokens: bool = False  # last block's patch tokens after ln_post (width-dim, not projected)
    patch_embeddings: bool = False  # last block's patch tokens after ln_post and proj (joint space)
    windows: frozenset[int] = frozenset()  # k of the k x k windows (stride 1) to embed

    def __or__(self, other: FeatureRequest) -> FeatureRequest:
        return FeatureRequest(
            blocks=self.blocks | other.blocks,
            patch_tokens=self.patch_tokens or other.patch_tokens,
            patch_embeddings=self.patch_embeddings or other.patch_embeddings,
            windows=self.windows | other.windows,
        )


@dataclass
class Features:
    """Image-tower outputs for N square inputs (tiles); every tensor's first dim is N."""

    image_embeddings: torch.Tensor  # [N, D] CLS -> ln_post -> proj, not normalised
    grid: tuple[int, int]
    patch_tokens: torch.Tensor | None = None  # [N, L, W]
    patch_embeddings: torch.Tensor | None = None  # [N, L, D]
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [N, L, W]
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> [N, n_windows, D]

    def __len__(self) -> int:
        return self.image_embeddings.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int] | slice) -> Features:
        if not isinstance(rows, slice | torch.Tensor):
            rows = torch.as_tensor(list(rows), dtype=torch.long, device=self.image_embeddings.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[rows]

        return Features(
            image_embeddings=pick(self.image_embeddings),
            grid=self.grid,
            patch_tokens=None if self.patch_tokens is None else pick(self.patch_tokens),
            patch_embeddings=None if self.patch_embeddings is None else pick(self.patch_embeddings),
            blocks={b: pick(t) for b, t in self.blocks.items()},
            windows={k: pick(t) for k, t in self.windows.items()},
        )


@lru_cache(maxsize=32)
def window_indices(grid_h: int, grid_w: int, k: int, device: str = "cpu") -> torch.Tensor:
    """[n_windows, k*k] flat patch indices of every k x k window, stride 1, row-major order."""
    rows = torch.arange(grid_h - k + 1)
    cols = torch.arange(grid_w - k + 1)
    top_left = (rows[:, None] * grid_w + cols[None, :]).reshape(-1)
    offsets = (torch.arange(k)[:, None] * grid_w + torch.arange(k)[None, :]).reshape(-1)
    return (top_left[:, None] + offsets[None, :]).to(device)


@lru_cache(maxsize=32)
def window_coverage(grid_h: int, grid_w: int, k: int, device: str = "cpu") -> torch.Tensor:
    """[L, n_windows] 0/1 matrix: patch p is covered by window u (for per-patch window averaging)."""
    idx = window_indices(grid_h, grid_w, k)
    cover = torch.zeros(grid_h * grid_w, idx.shape[0])
    cover.scatter_(0, idx.T.contiguous(), 1.0)
    return cover.to(device)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def select_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        # fp32 on CPU so scores match the fp32/GPU reference to 1e-5; bf16 is faster on CPUs with
        # bf16 units but shifts scores (bench/RESULTS.md), so it is opt-in.
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _wants_quick_gelu(spec: ModelSpec, source: weights_mod.WeightsSource) -> bool:
    if spec.quick_gelu != "auto":
        return spec.quick_gelu == "true"
    if spec.arch.endswith("-quickgelu"):
        return False  # the arch config already says so
    # OpenAI's CLIP was trained with QuickGELU; open_clip's plain arch configs use nn.GELU and would
    # load those weights silently into the wrong activation.
    text = source.value.lower()
    return (source.kind == "tag" and spec.pretrained == "openai") or (
        source.kind in ("file", "dir") and "openai" in os.path.basename(text.rstrip("/"))
    )


def load_open_clip(spec: ModelSpec) -> tuple[torch.nn.Module, object, bool]:
    """(model in eval mode, tokenizer, demo_weights). Never a silent random init."""
    import open_clip

    source = weights_mod.resolve(spec.arch, spec.pretrained)
    quick = _wants_quick_gelu(spec, source)
    demo = False
    if source.kind == "random":
        if not spec.demo:
            raise weights_mod.RandomWeightsNotAllowed(
                "pretrained='random' needs the explicit demo flag (--demo); random weights give "
                "meaningless scores"
            )
        model = open_clip.create_model(spec.arch, pretrained=None, force_quick_gelu=quick)
        tokenizer = open_clip.get_tokenizer(spec.arch)
        demo = True
        log.warning(DEMO_WARNING)
    elif source.kind == "dir" and os.path.isfile(os.path.join(source.value, "open_clip_config.json")):
        name = f"local-dir:{source.value}"
        model = open_clip.create_model(name, force_quick_gelu=quick, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    elif source.kind == "dir":
        found = open_clip.factory._find_checkpoint_in_dir(__import__("pathlib").Path(source.value))
        if not found:
            raise weights_mod.WeightsNotFoundError(
                weights_mod.missing_message(spec.arch, spec.pretrained, f"no checkpoint file in {source.value}")
            )
        model = open_clip.create_model(spec.arch, pretrained=found, force_quick_gelu=quick,
                                       require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec.arch)
    else:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="QuickGELU mismatch")
                model = open_clip.create_model(
                    spec.arch, pretrained=source.value, force_quick_gelu=quick,
                    require_pretrained=True, cache_dir=spec.cache_dir,
                )
        except Exception as exc:  # download failures surface as many types
            if source.kind == "tag":
                raise weights_mod.WeightsNotFoundError(
                    weights_mod.missing_message(spec.arch, spec.pretrained,
                                                f"download/cache lookup failed ({type(exc).__name__}: {exc})")
                ) from exc
            raise
        tokenizer = open_clip.get_tokenizer(spec.arch)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, demo


class ClipBackbone:
    """A loaded CLIP model on one device, with the feature taps detectors need."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = select_device(spec.device)
        self.dtype = select_dtype(spec.precision, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(spec.threads or os.cpu_count() or 1)
        model, tokenizer, demo = load_open_clip(spec)
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.tokenizer = tokenizer
        self.demo_weights = demo
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ValueError(f"{spec.arch}: inspectd's feature taps need a ViT image tower")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{spec.arch}: attentional-pool towers are not supported")
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError(f"{spec.arch}: expected a batch-first transformer (open_clip >= 2.24)")
        self.visual = visual
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.preprocessor = Preprocessor(self.image_size)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.fused_blocks = self._build_fused_blocks()

    def _build_fused_blocks(self) -> fused.FusedBlocks | None:
        """oneDNN blocks for the image tower on CPU (see fused.py), or None for open_clip's forward."""
        choice = self.spec.cpu_kernels
        if choice not in ("auto", "onednn", "torch"):
            raise ValueError(f"cpu_kernels must be auto, onednn or torch, not {choice!r}")
        if choice == "torch" or self.device.type != "cpu":
            return None
        reason = fused.support(self.visual.transformer, self.dtype)
        if reason:
            if choice == "onednn":
                raise ValueError(f"cpu_kernels=onednn: {self.spec.arch} cannot run fused: {reason}")
            log.info("image tower runs open_clip's blocks: %s", reason)
            return None
        return fused.FusedBlocks(self.visual.transformer, rows_hint=self._chunk_tokens())

    def _chunk_tokens(self) -> int:
        return self.spec.window_chunk_tokens or (2048 if self.device.type == "cpu" else 1 << 17)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.fused_blocks is not None:
            return self.fused_blocks.block(i, x)
        return self.visual.transformer.resblocks[i](x)

    def _window_cls(self, sequences: torch.Tensor) -> torch.Tensor:
        """The tower's CLS output [S, W] for a batch of window sequences [S, 1 + k*k, W]."""
        if self.fused_blocks is not None:
            return self.fused_blocks.cls_output(sequences)
        return self.visual.transformer(sequences)[:, 0]

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    # ---------------------------------------------------------------- text
    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [P, D] (fp32), cached by the exact prompt list."""
        key = tuple(prompts)
        cached = self._text_cache.get(key)
        if cached is not None:
            return cached
        chunks = []
        for start in range(0, len(key), 256):
            tokens = self.tokenizer(list(key[start:start + 256])).to(self.device)
            chunks.append(self._encode_tokens(tokens).float())
        embeddings = F.normalize(torch.cat(chunks), dim=-1)
        self._text_cache[key] = embeddings
        return embeddings

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of padded token ids, computed on the shortest context that holds them.

        CLIP's text tower is causal and pools at the end-of-text token, so the padding after the
        longest prompt of a batch cannot change any embedding; dropping it (typically 77 -> ~20
        tokens) makes prompt ensembles and randword training several times cheaper. Models without
        that structure take open_clip's own path.
        """
        model = self.model
        causal = getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", "") == "argmax"
        if not causal or not hasattr(model, "token_embedding"):
            return model.encode_text(tokens)
        length = int((tokens != 0).sum(dim=1).max().item())
        tokens = tokens[:, :max(length, 1)]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:tokens.shape[1]].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:tokens.shape[1], :tokens.shape[1]])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    # ---------------------------------------------------------------- image
    def _embed_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + CLS tokens with positional embeddings and ln_pre: [N, 1+L, W]."""
        return self.visual._embeds(pixels.to(device=self.device, dtype=self.dtype))

    def _project(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.visual.ln_post(cls_tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, request: FeatureRequest) -> Features:
        """Run the image tower once on [N, 3, S, S] and return the requested taps (fp32)."""
        tokens = self._embed_tokens(pixels)
        n = tokens.shape[0]
        x = tokens
        taps: dict[int, torch.Tensor] = {}
        for i in range(len(self.visual.transformer.resblocks)):
            x = self._block(i, x)
            if i in request.blocks:
                taps[i] = x[:, 1:].float()
        last = self.visual.ln_post(x)
        image_embeddings = (last[:, 0] @ self.visual.proj).float()
        features = Features(image_embeddings=image_embeddings, grid=self.grid, blocks=taps)
        if request.patch_tokens:
            features.patch_tokens = last[:, 1:].float()
        if request.patch_embeddings:
            features.patch_embeddings = (last[:, 1:] @ self.visual.proj).float()
        for k in sorted(request.windows):
            features.windows[k] = self.window_embeddings(tokens, k).reshape(n, -1, self.embed_dim)
        return features

    def window_embeddings(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Embeddings [N * n_windows, D] of every k x k window by token dropping.

        Each window keeps only its own k*k patch tokens and the CLS token, all with the positional
        embeddings of their original place (``tokens`` already has them added), and runs through
        the transformer as a sequence of 1 + k*k tokens; the CLS output -> ln_post -> proj.
        """
        n, _, width = tokens.shape
        idx = window_indices(*self.grid, k, str(self.device))  # [U, k*k]
        n_windows = idx.shape[0]
        patches = tokens[:, 1:][:, idx]  # [N, U, k*k, W]
        cls = tokens[:, :1, None, :].expand(n, n_windows, 1, width)
        sequences = torch.cat([cls, patches], dim=2).reshape(n * n_windows, 1 + k * k, width)
        per_chunk = max(1, self._chunk_tokens() // (1 + k * k))
        outputs = []
        for start in range(0, sequences.shape[0], per_chunk):
            outputs.append(self._project(self._window_cls(sequences[start:start + per_chunk])).float())
        return torch.cat(outputs)

    def describe(self) -> dict[str, str]:
        return {
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "kernels": "onednn" if self.fused_blocks is not None else "torch",
            "demo_weights": str(self.demo_weights).lower(),
        }
