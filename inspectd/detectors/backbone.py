"""The one CLIP backbone every detector shares: loading, devices, feature taps, window embeddings, text.

`ClipBackbone.forward` runs the image tower once for a batch and returns every feature any
detector of the batch asked for (`FeatureRequest`): the image embedding, patch tokens of chosen
blocks, and WinCLIP window embeddings computed by token dropping (all windows of all images in one
transformer batch per window size). Inputs of another size than the model's get bicubically
interpolated positional embeddings. A request names a tower variant: "plain", "visual_prompts"
(deep prompt tokens per row, for prompt learners) or one a detector registers (`register_tower`).
Text: `encode_text` (inference, bounded cache) and `encode_text_embeddings` (differentiable: prompt
token embeddings in, features out, no cache) for methods that learn prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from inspectd.detectors import compiled as compiled_mod
from inspectd.detectors import cpu_threads, fused
from inspectd.detectors import weights as weights_mod
from inspectd.detectors.preprocess import CLIP_MEAN, CLIP_STD, InputSpec, Preprocessor

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "DEMO MODE: CLIP runs with RANDOM weights; every score, verdict and table is MEANINGLESS. "
    "Get real weights with `inspectd weights fetch` (see README)."
)


# CLIP's (OpenAI's) pixel normalisation: what open_clip's LAION/OpenAI ViTs use and what a model without a
# preprocess_cfg gets (`normalisation`)
DEFAULT_NORMALISATION: dict[str, object] = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"}


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load and how to run it."""

    arch: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e31"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    precision: str = "auto"  # "auto" (fp32 on CPU, fp16 on CUDA) | "fp32" | "fp16" | "bf16"
    quick_gelu: str = "auto"  # "auto" | "true" | "false"  (OpenAI checkpoints were trained with QuickGELU)
    threads: int = 0  # torch's CPU threads (process-wide); 0 = leave as is (torch's default: one per core)
    cache_dir: str | None = None
    demo: bool = False  # allow pretrained="random" (loudly meaningless)
    window_chunk_tokens: int = 0  # rows per window-pass chunk and fused-block group; 0 = auto (CPU: 2048: cache-sized)
    cpu_kernels: str = "auto"  # "auto" (oneDNN fused blocks when the tower allows) | "onednn" (required) | "torch"
    cpu_gemm: str = "auto"  # the fused blocks' linears: "auto" (fused.auto_gemm: by the CPU) | "onednn" | "blas"
    seed: int = 0  # seed of random (demo) weights, so a demo is reproducible
    resize: str = "exact"  # frames to model inputs: "exact" (open_clip's bicubic) | "fast" (preprocess.RESIZE_MODES)
    compile: str = "off"  # torch.compile of the image tower's blocks: "off" | a mode of compiled.MODES

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
    tower: str = "plain"  # image tower variant: "plain", "visual_prompts", or a registered one

    def __or__(self, other: FeatureRequest) -> FeatureRequest:
        if self.tower != other.tower:
            raise ValueError(f"cannot merge requests for towers {self.tower!r} and {other.tower!r}: "
                             "one forward runs one tower variant (the pipeline groups by tower)")
        return FeatureRequest(
            tower=self.tower,
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


# A tower variant: (backbone, pixels [N,3,S,S], request, row_inputs) -> Features. Built-ins live on
# ClipBackbone; a detector adds its own (e.g. PromptAD's value-value path) with `register_tower`.
TowerFn = Callable[["ClipBackbone", torch.Tensor, FeatureRequest, Mapping[str, torch.Tensor]], Features]
_TOWERS: dict[str, TowerFn] = {}
TEXT_CACHE_ENTRIES = 512  # prompt lists kept by encode_text (LRU); a product's ensemble is a handful


def register_tower(name: str, fn: TowerFn) -> None:
    """Make an image-tower variant available to feature requests by ``name`` (same weights, other forward)."""
    if name in ("plain", "visual_prompts"):
        raise ValueError(f"tower {name!r} is built in")
    _TOWERS[name] = fn


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
    """Whether to force QuickGELU. OpenAI's CLIP (and some other releases: open_clip's pretrained cfg says
    ``quick_gelu``) was trained with QuickGELU; open_clip's plain arch configs use nn.GELU and would load those
    weights silently into the wrong activation. auto: the tag's pretrained cfg, or that of the release whose
    file name ``pretrained`` has (``ViT-L-14-336px.pt``), else "openai" in the file or folder name. For a folder
    without open_clip_config.json the file open_clip loads from it names the release first (the folder
    `inspectd weights fetch --out DIR` wrote holds ``ARCH-TAG.safetensors``)."""
    if spec.quick_gelu != "auto":
        return spec.quick_gelu == "true"
    if spec.arch.endswith("-quickgelu"):
        return False  # the arch config already says so
    if source.kind == "tag":
        cfg = weights_mod.pretrained_cfg(spec.arch, spec.pretrained)
        return bool(cfg.get("quick_gelu")) if cfg else spec.pretrained == "openai"
    if source.kind not in ("file", "dir"):
        return False
    names = [os.path.basename(source.value.rstrip("/"))]
    if source.kind == "dir" and not os.path.isfile(os.path.join(source.value, "open_clip_config.json")):
        names.insert(0, os.path.basename(_checkpoint_file(source)))
    for name in names:
        release = weights_mod.release_of(spec.arch, name)
        if release is not None:
            return bool(release[1].get("quick_gelu"))
    return any("openai" in name.lower() for name in names)


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    """The activation the loaded model really runs (a local folder's config may set it, whatever was asked)."""
    return any(type(m).__name__ == "QuickGELU" for m in model.modules())


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the state_dict's floating tensors holding NaN or inf (a damaged copy, a diverged fine-tune): such
    weights load without complaint and make every score NaN (every frame a dead letter, every metric NaN)."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def tensors_id(model: torch.nn.Module) -> str:
    """A hash of the loaded weights themselves (every state_dict tensor's name, shape and float32 values), so the
    same weights have one identity in any container (a .pt or .safetensors file, a hub folder, a tag's download)
    and files of the same name with other weights have another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        t = (t.float() if t.is_floating_point() else t).to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return "tensors-sha256:" + digest.hexdigest()


def normalisation(arch: str, source: weights_mod.WeightsSource, loaded: Mapping[str, object]) -> dict[str, object]:
    """The pixel normalisation (mean, std, interpolation) the weights were trained with. ``loaded``: open_clip's
    preprocess_cfg of the model it built, right for a tag (its pretrained cfg) and a folder with an
    open_clip_config.json; for a file (and a folder without config) open_clip knows only the arch, so the release
    the file's name names (`weights.release_of`) and the open_clip_config.json of the hub folder it sits in (when it
    is that folder's checkpoint) overlay it. CLIP's OpenAI values where nothing says otherwise."""
    cfg: dict[str, object] = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"}
    overlays: list[Mapping[str, object]] = [loaded]
    if source.kind == "file" or (source.kind == "dir" and not (Path(source.value) / "open_clip_config.json").is_file()):
        checkpoint = Path(_checkpoint_file(source))
        release = weights_mod.release_of(arch, checkpoint.name)
        if release is not None:
            overlays.append(release[1])
        config = checkpoint.parent / "open_clip_config.json"
        if source.kind == "file" and config.is_file() and _checkpoint_file(
                weights_mod.WeightsSource("dir", str(checkpoint.parent))) == str(checkpoint):
            try:
                found = json.loads(config.read_text()).get("preprocess_cfg")
            except (OSError, ValueError, AttributeError) as exc:
                raise ValueError(f"{config} (the open_clip config beside {checkpoint}) is unreadable: {exc}") from exc
            overlays.append(found if isinstance(found, Mapping) else {})
    for overlay in overlays:
        cfg.update({k: overlay[k] for k in cfg if overlay.get(k) is not None})
    interpolation = "bicubic" if cfg["interpolation"] == "random" else str(cfg["interpolation"])  # (training only)
    return {"mean": tuple(float(m) for m in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"]),
            "interpolation": interpolation}


def _checkpoint_file(source: weights_mod.WeightsSource) -> str:
    """The weights file open_clip loads for a file or folder source."""
    if source.kind == "dir":
        import open_clip

        return open_clip.factory._find_checkpoint_in_dir(Path(source.value)) or source.value
    return source.value


def _load_error(spec: ModelSpec, source: weights_mod.WeightsSource, exc: Exception) -> Exception:
    """The error to raise for a file/folder checkpoint that open_clip failed to load (path, arch, what to do)."""
    import open_clip

    if source.kind == "file" and open_clip.get_model_config(spec.arch) is None:
        return ValueError(f"model.arch {spec.arch!r} is not an open_clip arch (open_clip.list_models() lists them)")
    return weights_mod.WeightsLoadError(
        weights_mod.load_failure_message(spec.arch, spec.pretrained, _checkpoint_file(source), exc))


def _hub_offline() -> bool:
    """Whether the Hugging Face hub runs offline: its own reading of HF_HUB_OFFLINE (it takes 1/ON/YES/TRUE in any
    case, read when it was imported)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


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
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(spec.seed)
            model = open_clip.create_model(spec.arch, pretrained=None, force_quick_gelu=quick)
        tokenizer = open_clip.get_tokenizer(spec.arch)
        demo = True
        log.warning(DEMO_WARNING)
    elif source.kind == "dir":
        found = open_clip.factory._find_checkpoint_in_dir(Path(source.value))
        if not found:
            others = sorted(p.name for p in Path(source.value).glob("*.pt"))
            why = f"no checkpoint file in {source.value}" + (
                f" (open_clip finds *.safetensors, *.bin and *.pth in a folder, not {', '.join(others)}: set "
                "model.pretrained to the file itself)" if others else "")
            raise weights_mod.WeightsNotFoundError(weights_mod.missing_message(spec.arch, spec.pretrained, why))
        local = os.path.isfile(os.path.join(source.value, "open_clip_config.json"))
        name = f"local-dir:{source.value}" if local else spec.arch
        try:
            model = open_clip.create_model(name, pretrained=None if local else found, force_quick_gelu=quick,
                                           require_pretrained=True)
        except Exception as exc:  # noqa: BLE001 - a bad file fails in torch, safetensors or open_clip alike
            raise _load_error(spec, source, exc) from exc
        tokenizer = open_clip.get_tokenizer(name)
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
                offline = _hub_offline()
                why = ("not in the local hub cache and HF_HUB_OFFLINE is set" if offline else
                       f"download/cache lookup failed ({type(exc).__name__}: {weights_mod.error_summary(exc)}); on a "
                       "machine without internet set HF_HUB_OFFLINE=1 so this fails at once instead of after the "
                       "hub's retries")
                raise weights_mod.WeightsNotFoundError(
                    weights_mod.missing_message(spec.arch, spec.pretrained, why)) from exc
            raise _load_error(spec, source, exc) from exc
        tokenizer = open_clip.get_tokenizer(spec.arch)
    broken = non_finite_tensors(model)
    if broken:
        where = _checkpoint_file(source) if source.kind in ("file", "dir") else f"{spec.arch}/{spec.pretrained}"
        raise weights_mod.WeightsLoadError(
            f"CLIP weights {where} (arch={spec.arch!r}) hold NaN or infinite values in {len(broken)} tensor(s) "
            f"({', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}): every score would be NaN. A damaged copy "
            "or a diverged fine-tune.\n"
            f"  check the file: inspectd weights verify {where}\n"
            f"  get a good copy on a machine with internet: inspectd weights fetch {spec.arch} <TAG> --out DIR")
    if not demo and weights_mod.marked_random(source):
        demo = True  # a seeded random-weight checkpoint inspectd wrote (tests, benchmarks): as meaningless
        log.warning("%s (%s is marked as random weights by inspectd's generator)", DEMO_WARNING, source.value)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, demo


class ClipBackbone:
    """A loaded CLIP model on one device, with the feature taps detectors need."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        if spec.compile not in compiled_mod.MODES:  # before the weights load: a typo fails at once
            raise ValueError(f"compile must be one of {', '.join(compiled_mod.MODES)}, not {spec.compile!r}")
        fused.check_gemm(spec.cpu_gemm)
        if spec.compile != "off" and spec.cpu_kernels == "onednn":
            raise ValueError(f"compile={spec.compile} replaces the oneDNN fused blocks: it cannot run with "
                             "cpu_kernels=onednn")
        self.device = select_device(spec.device)
        self.dtype = select_dtype(spec.precision, self.device)
        if self.device.type == "cpu":
            cpu_threads.use_threads(spec.threads)
        model, tokenizer, demo = load_open_clip(spec)
        # the weights' identity is taken before the cast to fp16/bf16 would round them
        self._weights_id = f"random:seed={spec.seed}" if spec.pretrained == weights_mod.RANDOM_WEIGHTS else \
            tensors_id(model)
        self.quick_gelu = uses_quick_gelu(model)
        self.normalisation = normalisation(spec.arch, weights_mod.resolve(spec.arch, spec.pretrained),
                                           getattr(model.visual, "preprocess_cfg", None) or {})
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
        self._preprocessors: dict[InputSpec, Preprocessor] = {}
        self.preprocessor = self.preprocessor_for(InputSpec(self.image_size))
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._identity: dict[str, object] | None = None
        self.forwards = 0  # image-tower forwards run (tests and metrics count batching with it)
        self.compiled = self._build_compiled()
        self.fused_blocks = None if self.compiled is not None else self._build_fused_blocks()

    def _build_compiled(self) -> compiled_mod.CompiledBlocks | None:
        """torch.compile'd blocks for the inference forwards (compiled.py), or None (model.compile: off)."""
        if self.spec.compile == "off":
            return None
        blocks = compiled_mod.CompiledBlocks(self.visual.transformer, self.spec.compile, self.device)
        x = torch.zeros(1, 1 + self.grid[0] * self.grid[1], self.width, device=self.device, dtype=self.dtype)
        try:  # one shape now (the batches of one input need it anyway): a machine that cannot compile fails at load
            with torch.inference_mode():
                blocks(x)
        except Exception as exc:  # noqa: BLE001 - Inductor raises many types (no C++ compiler, no Triton, ...)
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            raise ValueError(f"model.compile={self.spec.compile}: torch.compile failed on this machine ({reason}); "
                             "set model.compile: off") from exc
        return blocks

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
        return fused.FusedBlocks(self.visual.transformer, rows_hint=self._chunk_tokens(), gemm=self.spec.cpu_gemm)

    def _chunk_tokens(self) -> int:
        return self.spec.window_chunk_tokens or (2048 if self.device.type == "cpu" else 1 << 17)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on [S, L, W] as every tower runs it (fused on CPU, else open_clip's; never the compiled
        blocks, which only `forward`'s own plain pass runs)."""
        if self.fused_blocks is not None:
            return self.fused_blocks.block(i, x)
        return self.visual.transformer.resblocks[i](x)

    def _window_cls(self, sequences: torch.Tensor) -> torch.Tensor:
        """The tower's CLS output [S, W] for a batch of window sequences [S, 1 + k*k, W]."""
        if self.fused_blocks is not None:
            return self.fused_blocks.cls_output(sequences)
        if self.compiled is not None:
            self.compiled.begin_forward()  # the previous pass's outputs were projected (copied) already
            return self.compiled(sequences)[:, 0]  # (_project makes the copy that outlives the next replay)
        return self.visual.transformer(sequences)[:, 0]

    def _owned(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in memory of its own where it may be a view of a CUDA graph's output (replayed buffers are
        overwritten by the next replay); fp16/bf16 towers copy anyway when features turn fp32."""
        if self.compiled is not None and self.compiled.cuda_graphs and t.dtype == torch.float32:
            return t.clone()
        return t

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def identity(self) -> dict[str, object]:
        """What a learned part or a cached state depends on, comparable across machines (paths differ, contents
        do not): arch, the weights' name and content id, the activation the model runs, the dtype it runs in,
        whether the weights are random (demo), and the shapes. Learned parts are checked on arch, weights (the
        content id; the name for artifacts from before it was recorded), activation and shapes
        (`artifacts.check_backbone`); the dtype only keys caches."""
        if self._identity is None:
            name = weights_mod.pretrained_identity(self.spec.arch, self.spec.pretrained)
            self._identity = {
                "arch": self.spec.arch, "weights": name,
                "weights_id": self.weights_id, "demo_weights": self.demo_weights, "quick_gelu": self.quick_gelu,
                "dtype": str(self.dtype).replace("torch.", ""), "embed_dim": self.embed_dim, "width": self.width,
                "image_size": self.image_size}
            if self.normalisation != DEFAULT_NORMALISATION:  # (CLIP's own keeps the hashes of states built before)
                self._identity["normalisation"] = dict(self.normalisation)
        return dict(self._identity)

    @property
    def weights_id(self) -> str:
        """The loaded weights' content identity (keys caches, ties learned parts to their CLIP): a hash of the
        tensors as loaded (`tensors_id`: the same for the same weights as a tag, a file or a folder, in any
        container), or the seed of random demo weights."""
        return self._weights_id

    def preprocessor_for(self, spec: InputSpec) -> Preprocessor:
        """The (cached) pre-processor for a detector's input spec."""
        found = self._preprocessors.get(spec)
        if found is None:
            found = self._preprocessors[spec] = Preprocessor(spec.size, mode=spec.mode, resize=self.spec.resize,
                                                             **self.normalisation)
        return found

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    # ---------------------------------------------------------------- text
    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [P, D] (fp32), cached (LRU, bounded) by the exact prompt list."""
        key = tuple(prompts)
        cached = self._text_cache.get(key)
        if cached is not None:
            self._text_cache.move_to_end(key)
            return cached
        chunks = []
        for start in range(0, len(key), 256):
            tokens = self.tokenizer(list(key[start:start + 256])).to(self.device)
            chunks.append(self._encode_tokens(tokens).float())
        embeddings = F.normalize(torch.cat(chunks), dim=-1)
        self._text_cache[key] = embeddings
        while len(self._text_cache) > TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        return embeddings

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [P, 77], token embeddings [P, 77, W] without positions) -- the starting point of prompt
        learning: replace rows of the embeddings with learnable context vectors, then `encode_text_embeddings`."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.no_grad():
            embeddings = self.model.token_embedding(tokens)
        return tokens, embeddings

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot_positions: torch.Tensor,
                               deep_prompts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Differentiable text features [P, D] (not normalised, not cached) from token embeddings [P, T, W].

        ``eot_positions`` [P]: index of each prompt's end-of-text token (its pooled position).
        ``deep_prompts``: optional per-layer context tensors [n_ctx, W] that replace tokens 1..n_ctx at the
        input of layer j (deep prompting, e.g. AnoPLe's textual prompts); layer 0's are already in
        ``embeddings``. Gradients flow to ``embeddings`` and ``deep_prompts``; the tower stays frozen.
        """
        model = self.model
        length = int(eot_positions.max().item()) + 1
        x = embeddings[:, :length].to(self.dtype) + model.positional_embedding[:length].to(self.dtype)
        mask = model.attn_mask[:length, :length] if getattr(model, "attn_mask", None) is not None else None
        for j, block in enumerate(model.transformer.resblocks):
            if deep_prompts is not None and 0 < j < len(deep_prompts) and deep_prompts[j] is not None:
                n_ctx = deep_prompts[j].shape[0]
                ctx = deep_prompts[j].to(x.dtype)[None].expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + n_ctx:]], dim=1)
            x = block(x, attn_mask=mask)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions.to(x.device)]
        projection = model.text_projection
        if projection is None:
            return x.float()
        out = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return out.float()

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
        eot = tokens.argmax(dim=-1)
        length = int(eot.max().item()) + 1
        return self.encode_text_embeddings(model.token_embedding(tokens[:, :length]), eot)

    # ---------------------------------------------------------------- image
    def _embed_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + CLS tokens with positional embeddings and ln_pre: [N, 1+L, W] (any input size)."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if pixels.shape[-1] == self.image_size and pixels.shape[-2] == self.image_size:
            return self.visual._embeds(pixels)
        visual = self.visual
        x = visual.conv1(pixels)
        grid = (x.shape[2], x.shape[3])
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positions(grid).to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embeddings [1+gh*gw, W] for another patch grid: the trained grid's, bicubically resized
        (how APRIL-GAN runs a 336-px ViT at 518 px)."""
        found = self._pos_cache.get(grid)
        if found is None:
            pos = self.visual.positional_embedding.detach().float()
            gh, gw = self.grid
            patches = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            resized = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
            found = torch.cat([pos[:1], resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
            found = self._pos_cache[grid] = found.to(self.dtype)
        return found

    def input_grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        return pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size

    def _project(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.visual.ln_post(cls_tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def batch_pixels(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """One [N, 3, S, S] batch of the frames' [n_i, 3, S, S] views, ready for `forward`. On a GPU it is
        assembled straight into pinned host memory and copied without blocking: one host copy (a pageable
        tensor's copy is staged through pinned memory by the driver anyway) and the engine thread goes on to
        queue the forward's kernels behind the copy. torch's pinned-memory cache keeps the block until the copy
        has finished. On the CPU: one torch.cat."""
        if self.device.type != "cuda":
            return torch.cat(list(views))
        first = views[0]
        host = torch.empty((sum(v.shape[0] for v in views), *first.shape[1:]), dtype=first.dtype, pin_memory=True)
        torch.cat(list(views), out=host)
        return host.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, request: FeatureRequest,
                row_inputs: Mapping[str, torch.Tensor] | None = None) -> Features:
        """Run the image tower once on [N, 3, S, S] and return the requested taps (fp32).

        ``row_inputs`` carries per-row tensors a tower variant needs (e.g. "visual_prompts" [N, J, P, W]).
        """
        self.forwards += 1
        if self.device.type == "cpu":
            cpu_threads.settle_thread()
        if request.tower == "plain":
            return self._plain(pixels, request)
        if request.tower == "visual_prompts":
            prompts = (row_inputs or {}).get("visual_prompts")
            if prompts is None:
                raise ValueError("tower 'visual_prompts' needs row_inputs['visual_prompts'] [N, J, P, W]")
            return self.prompted_forward(pixels, request, prompts)
        tower = _TOWERS.get(request.tower)
        if tower is None:
            raise ValueError(f"unknown tower variant {request.tower!r}; known: plain, visual_prompts, "
                             f"{', '.join(sorted(_TOWERS)) or '-'}")
        return tower(self, pixels, request, row_inputs or {})

    def _plain(self, pixels: torch.Tensor, request: FeatureRequest) -> Features:
        if self.compiled is None:
            return self._plain_pass(pixels, request)
        rows = pixels.shape[0]
        if self.compiled.cuda_graphs:  # graphs replay fixed shapes: rows padded to a bucket, dropped at the end
            pixels = compiled_mod.pad_rows(pixels, compiled_mod.bucket(rows))
        with self.compiled.lock:
            self.compiled.begin_forward()
            features = self._plain_pass(pixels, request)
        return features if len(features) == rows else features.select(slice(0, rows))

    def _plain_pass(self, pixels: torch.Tensor, request: FeatureRequest) -> Features:
        tokens = self._embed_tokens(pixels)
        n = tokens.shape[0]
        grid = self.input_grid(pixels)
        x = tokens
        taps: dict[int, torch.Tensor] = {}
        last = len(self.visual.transformer.resblocks) - 1
        for i in range(last + 1):
            if i == last and self.fused_blocks is not None and not (
                    request.patch_tokens or request.patch_embeddings or last in request.blocks):
                x = self.fused_blocks.cls_block(x)  # only the image embedding is read: token 0 is enough
                continue
            x = self.compiled.block(i, x) if self.compiled is not None else self._block(i, x)
            if i in request.blocks:
                taps[i] = self._owned(x[:, 1:].float())
        features = self._outputs(x, grid, taps, request)
        for k in sorted(request.windows):
            features.windows[k] = self.window_embeddings(tokens, k, grid).reshape(n, -1, self.embed_dim)
        return features

    def warm_up(self, request: FeatureRequest, size: int, max_rows: int) -> int:
        """Compile the blocks now for batches of 1..``max_rows`` ``size``-px inputs under ``request``
        (model.compile), so no frame waits for a compile: batches of 1 and 2 (rows are dynamic: one graph serves
        every larger batch), and under CUDA graphs every bucket, twice (the first run warms up, the second
        records). The shapes run; nothing without compile."""
        if self.compiled is None or request.tower != "plain":
            return 0
        before = len(self.compiled.shapes)
        sizes = compiled_mod.buckets_up_to(max_rows) if self.compiled.cuda_graphs else [1, 2] if max_rows > 1 else [1]
        for rows in sizes:
            for _ in range(2 if self.compiled.cuda_graphs else 1):
                self.forward(torch.zeros(rows, 3, size, size, device=self.device), request)
        return len(self.compiled.shapes) - before

    def _outputs(self, x: torch.Tensor, grid: tuple[int, int], taps: dict[int, torch.Tensor],
                 request: FeatureRequest) -> Features:
        last = self.visual.ln_post(x)
        image_embeddings = (last[:, 0] @ self.visual.proj).float()
        features = Features(image_embeddings=image_embeddings, grid=grid, blocks=taps)
        if request.patch_tokens:
            features.patch_tokens = last[:, 1:].float()
        if request.patch_embeddings:
            features.patch_embeddings = (last[:, 1:] @ self.visual.proj).float()
        return features

    def prompted_forward(self, pixels: torch.Tensor, request: FeatureRequest, prompts: torch.Tensor) -> Features:
        """Deep visual prompting: P prompt tokens per row enter after the CLS token at layer 0 and are replaced
        by that row's next set at the input of each layer j < J; they are dropped from every patch tap.

        ``prompts`` [N, J, P, W]: per-row, so products with different learned prompts share one forward.
        Not under inference_mode when called directly (gradients reach ``prompts`` for training).
        """
        if request.windows:
            raise ValueError("tower 'visual_prompts' does not compute window embeddings")
        tokens = self._embed_tokens(pixels)
        grid = self.input_grid(pixels)
        n_layers, n_prompts = prompts.shape[1], prompts.shape[2]
        prompts = prompts.to(device=tokens.device, dtype=tokens.dtype)
        x = torch.cat([tokens[:, :1], prompts[:, 0], tokens[:, 1:]], dim=1)
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.visual.transformer.resblocks):
            if 0 < i < n_layers:
                x = torch.cat([x[:, :1], prompts[:, i], x[:, 1 + n_prompts:]], dim=1)
            x = block(x)
            if i in request.blocks:
                taps[i] = x[:, 1 + n_prompts:].float()
        x = torch.cat([x[:, :1], x[:, 1 + n_prompts:]], dim=1)
        return self._outputs(x, grid, taps, request)

    def window_embeddings(self, tokens: torch.Tensor, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Embeddings [N * n_windows, D] of every k x k window by token dropping.

        Each window keeps only its own k*k patch tokens and the CLS token, all with the positional
        embeddings of their original place (``tokens`` already has them added), and runs through
        the transformer as a sequence of 1 + k*k tokens; the CLS output -> ln_post -> proj.
        """
        n, _, width = tokens.shape
        idx = window_indices(*(grid or self.grid), k, str(self.device))  # [U, k*k]
        n_windows = idx.shape[0]
        patches = tokens[:, 1:][:, idx]  # [N, U, k*k, W]
        cls = tokens[:, :1, None, :].expand(n, n_windows, 1, width)
        sequences = torch.cat([cls, patches], dim=2).reshape(n * n_windows, 1 + k * k, width)
        outputs = [self._project(self._window_cls(sequences[start:end])).float()
                   for start, end in fused.even_groups(sequences.shape[0], 1 + k * k, self._chunk_tokens())]
        return torch.cat(outputs)

    def describe(self) -> dict[str, str]:
        return {
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "kernels": "onednn" if self.fused_blocks is not None else
                       f"inductor:{self.spec.compile}" if self.compiled is not None else "torch",
            "gemm": self.fused_blocks.gemm if self.fused_blocks is not None else "",
            "demo_weights": str(self.demo_weights).lower(),
            "resize": self.spec.resize,
        }
