"""Random-word prompt data and the category-agnostic FFN trained on CLIP text embeddings (spec: randword.md).

Owns prompt generation, batched text encoding, the FFN, its seeded training loop and its versioned
safetensors file (tied to the CLIP model whose text encoder produced the training data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FFN_FORMAT = "inspectd-randword-ffn"
FFN_FORMAT_VERSION = 1
# "[w1] a [w2] photo [w3] of [w4] [n] [w5]": one random word before, between and after the words of
# "a photo of [n] object"; the state phrase and the object word together fill the [n] place.
DEFAULT_TEMPLATE = "{w} a {w} photo {w} of {w} {state} {object} {w}"


@dataclass(frozen=True)
class PromptConfig:
    """How the random-word training prompts are written."""

    normal_word: str = "a"
    anomaly_word: str = "a damaged"
    object_word: str = "object"  # "object" (category-agnostic) or a category name
    template: str = DEFAULT_TEMPLATE  # "{w}" = a fresh random word, "{state}", "{object}"
    min_len: int = 5
    max_len: int = 10
    alphabet: str = string.ascii_letters + string.digits

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"random word lengths need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not self.alphabet:
            raise ValueError("random word alphabet is empty")
        if "{state}" not in self.template:
            raise ValueError(f"template {self.template!r} has no {{state}} slot")


@dataclass(frozen=True)
class TrainConfig:
    """FFN shape and optimisation (spec defaults; lr / weight decay are the spec's reading of the paper)."""

    pairs: int = 10_000
    hidden: tuple[int, ...] = (512, 256, 128)
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128  # prompts per batch (an even number: whole pairs)
    epochs: int = 2
    lr_decay: float = 0.1  # lr *= lr_decay after each epoch listed in decay_after
    decay_after: tuple[int, ...] = (1,)
    seed: int = 0
    encode_chunk: int = 512  # prompts per encode_text call (progress granularity)

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"pairs must be >= 1, got {self.pairs}")
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"batch_size must be an even number >= 2 (whole pairs), got {self.batch_size}")
        if len(self.hidden) < 1:
            raise ValueError("the FFN needs at least one hidden layer")


# ---------------------------------------------------------------------------- prompts
def random_word(rng: random.Random, config: PromptConfig) -> str:
    """Characters drawn uniformly from the alphabet; length uniform in [min_len, max_len]."""
    length = rng.randint(config.min_len, config.max_len)
    return "".join(rng.choices(config.alphabet, k=length))


def fill_template(rng: random.Random, config: PromptConfig, state: str) -> str:
    """The template with a fresh random word in every ``{w}`` slot."""
    parts = config.template.split("{w}")
    words = [random_word(rng, config) for _ in range(len(parts) - 1)]
    text = parts[0] + "".join(w + p for w, p in zip(words, parts[1:], strict=True))
    text = text.replace("{state}", state).replace("{object}", config.object_word)
    return " ".join(text.split())  # an empty object word leaves no double space


def generate_pairs(n: int, config: PromptConfig, seed: int) -> list[tuple[str, str]]:
    """``n`` (normal, anomalous) prompt pairs; the same (n, config, seed) always gives the same pairs."""
    rng = random.Random(seed)
    return [(fill_template(rng, config, config.normal_word), fill_template(rng, config, config.anomaly_word))
            for _ in range(n)]


def pair_batches(n_pairs: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled row batches over interleaved rows (2i = normal, 2i+1 = anomalous of pair i).

    Pairs are shuffled, never split: both prompts of a pair always land in the same batch.
    """
    order = torch.randperm(n_pairs, generator=generator)
    per = batch_size // 2
    batches = []
    for start in range(0, n_pairs, per):
        chosen = order[start:start + per]
        batches.append(torch.stack([2 * chosen, 2 * chosen + 1], dim=1).reshape(-1))
    return batches


def encode_prompts(backbone: Any, prompts: Sequence[str], chunk: int = 512, progress: bool = True,
                   desc: str = "encode prompts") -> torch.Tensor:
    """L2-normalised text embeddings [P, D] on CPU, through the backbone's cached ``encode_text``."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            out.append(backbone.encode_text(list(part)).float().cpu())
            bar.update(len(part))
    return F.normalize(torch.cat(out), dim=-1)


# ---------------------------------------------------------------------------- the FFN
class RandWordFFN(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout per hidden layer, then Linear -> one logit."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (512, 256, 128), dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N] for inputs [N, D] (callers L2-normalise, as in training)."""
        return self.net(x).squeeze(-1)


def train_ffn(normal: torch.Tensor, anomalous: torch.Tensor, config: TrainConfig, progress: bool = True,
              ) -> tuple[RandWordFFN, list[dict[str, float]]]:
    """Train on pairs (normal[i] label 0, anomalous[i] label 1); returns the FFN in eval mode and per-epoch stats."""
    from tqdm.auto import tqdm

    if normal.shape != anomalous.shape:
        raise ValueError(f"normal {tuple(normal.shape)} and anomalous {tuple(anomalous.shape)} embeddings differ")
    n_pairs, dim = normal.shape
    x = torch.stack([F.normalize(normal.float(), dim=-1), F.normalize(anomalous.float(), dim=-1)], dim=1)
    x = x.reshape(2 * n_pairs, dim)
    y = torch.tensor([0.0, 1.0]).repeat(n_pairs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = RandWordFFN(dim, config.hidden, config.dropout)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        history = []
        steps = config.epochs * -(-n_pairs // (config.batch_size // 2))
        with tqdm(total=steps, desc="train FFN", unit="batch", disable=not progress) as bar:
            for epoch in range(1, config.epochs + 1):
                model.train()
                total, seen = 0.0, 0
                for rows in pair_batches(n_pairs, config.batch_size, generator):
                    loss = F.binary_cross_entropy_with_logits(model(x[rows]), y[rows])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(rows)
                    seen += len(rows)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{total / seen:.4f}")
                history.append({"epoch": epoch, "loss": total / seen, "lr": optimiser.param_groups[0]["lr"]})
                if epoch in config.decay_after:
                    for group in optimiser.param_groups:
                        group["lr"] *= config.lr_decay
    model.eval()
    return model, history


# ---------------------------------------------------------------------------- fitted bundle, file format
@dataclass
class FfnBundle:
    """A trained FFN and what it is tied to."""

    model: RandWordFFN
    arch: str
    pretrained: str
    embed_dim: int
    prompts: PromptConfig
    train: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return f"{self.arch}/{self.pretrained}"

    @torch.inference_mode()
    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """s_FNN = sigmoid(FFN(e / |e|)) for embeddings [N, D] (BatchNorm in eval mode)."""
        self.model.eval()
        return torch.sigmoid(self.model(F.normalize(embeddings.float(), dim=-1)))


class FfnBackboneMismatch(ValueError):
    """An FFN file was loaded under a CLIP model other than the one whose text encoder trained it."""


def fit_randword_ffn(backbone: Any, prompts: PromptConfig | None = None, train: TrainConfig | None = None,
                     progress: bool = True) -> FfnBundle:
    """Generate N random-word pairs, encode them with ``backbone``, train the FFN (all seeded)."""
    prompts = prompts or PromptConfig()
    train = train or TrainConfig()
    pairs = generate_pairs(train.pairs, prompts, train.seed)
    normal = encode_prompts(backbone, [p[0] for p in pairs], train.encode_chunk, progress, "encode normal")
    anomalous = encode_prompts(backbone, [p[1] for p in pairs], train.encode_chunk, progress, "encode anomalous")
    model, history = train_ffn(normal, anomalous, train, progress)
    spec = backbone.spec
    return FfnBundle(model, spec.arch, spec.pretrained, int(backbone.embed_dim), prompts, train, history)


def _pretrained_identity(arch: str, pretrained: str) -> str:
    """The weights' identity across machines: a tag, or a file/folder's name (paths differ per machine).

    A released checkpoint file (``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``) maps to its tag.
    """
    from inspectd.detectors import weights

    if not weights.looks_like_path(pretrained):
        return pretrained
    name = Path(pretrained.rstrip("/\\")).name
    for (known_arch, tag), entry in weights.KNOWN_CHECKPOINTS.items():
        if known_arch == arch and entry["file"] == name:
            return tag
    return name


def check_backbone(bundle_arch: str, bundle_pretrained: str, bundle_dim: int, backbone: Any,
                   where: str = "FFN") -> None:
    """Raise `FfnBackboneMismatch` naming both models unless ``backbone`` is the FFN's CLIP."""
    ours = f"{bundle_arch}/{bundle_pretrained}"
    theirs = backbone.model_id
    same = (bundle_arch == backbone.spec.arch
            and _pretrained_identity(bundle_arch, bundle_pretrained)
            == _pretrained_identity(backbone.spec.arch, backbone.spec.pretrained)
            and bundle_dim == int(backbone.embed_dim))
    if not same:
        raise FfnBackboneMismatch(
            f"{where} was trained on text embeddings of CLIP {ours} (embed dim {bundle_dim}) but the backbone "
            f"is {theirs} (embed dim {backbone.embed_dim}); an FFN only works with the CLIP that produced its "
            f"training data. Re-run `inspectd fit randword --arch {backbone.spec.arch} "
            f"--pretrained {backbone.spec.pretrained} --out FILE`."
        )


def save_ffn(bundle: FfnBundle, path: str | Path) -> Path:
    """Write the FFN (weights + BatchNorm statistics) and its provenance as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    meta = {
        "format": FFN_FORMAT,
        "format_version": str(FFN_FORMAT_VERSION),
        "arch": bundle.arch,
        "pretrained": bundle.pretrained,
        "model_id": bundle.model_id,
        "embed_dim": str(bundle.embed_dim),
        "hidden": json.dumps(list(bundle.model.hidden)),
        "dropout": str(bundle.model.dropout),
        "train_config": json.dumps(dataclasses.asdict(bundle.train)),
        "prompt_config": json.dumps(dataclasses.asdict(bundle.prompts)),
        "words": json.dumps({"normal": bundle.prompts.normal_word, "anomaly": bundle.prompts.anomaly_word,
                             "object": bundle.prompts.object_word}),
        "history": json.dumps(bundle.history),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _tuple_fields(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**kept)


def load_ffn(path: str | Path, backbone: Any | None = None) -> FfnBundle:
    """Read an FFN file; with ``backbone`` given, refuse (FfnBackboneMismatch) one trained under another CLIP."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FFN file {path}; write one with `inspectd fit randword --out {path}`")
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open API
    if meta.get("format") != FFN_FORMAT:
        raise ValueError(f"{path}: not a random-word FFN file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FFN_FORMAT_VERSION):
        raise ValueError(f"{path}: FFN file format version {meta.get('format_version')!r}; this inspectd reads "
                         f"{FFN_FORMAT_VERSION}")
    embed_dim = int(meta["embed_dim"])
    if backbone is not None:
        check_backbone(meta["arch"], meta["pretrained"], embed_dim, backbone, where=f"FFN {path}")
    model = RandWordFFN(embed_dim, json.loads(meta["hidden"]), float(meta["dropout"]))
    model.load_state_dict(tensors)
    model.eval()
    return FfnBundle(model, meta["arch"], meta["pretrained"], embed_dim,
                     _tuple_fields(PromptConfig, json.loads(meta["prompt_config"])),
                     _tuple_fields(TrainConfig, json.loads(meta["train_config"])),
                     json.loads(meta.get("history", "[]")))
