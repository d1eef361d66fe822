"""Random-word prompt data and the category-agnostic FFN trained on CLIP text embeddings (spec: randword.md).

Owns prompt generation, batched text encoding, the FFN, its training (on the shared loop) and its
trainer for `inspectd fit randword`; the FFN is saved as a learned-part artifact tied to the CLIP
model whose text encoder produced the training data.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from inspectd.detectors.artifacts import (
    LEARNED,
    Artifact,
    ArtifactMismatch,
    check_backbone,
    load_artifact,
    save_artifact,
)
from inspectd.detectors.context import FitContext
from inspectd.detectors.training.loop import LoopConfig, train
from inspectd.detectors.training.losses import binary_cross_entropy_with_logits
from inspectd.detectors.training.trainer import Trainer, TrainingData
from inspectd.detectors.weights import pretrained_identity

log = logging.getLogger(__name__)

RANDWORD_VERSION = 1  # the randword detector's version (its maths); recorded in every FFN artifact
REFIT_HINT = "re-fit it with `inspectd fit randword --out FILE` (files from before inspectd's artifact format " \
             "cannot be read)"
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


def _loop_config(config: TrainConfig) -> LoopConfig:
    """The random-word recipe on the shared loop: AdamW, lr x lr_decay after each epoch in decay_after."""
    return LoopConfig(epochs=config.epochs, lr=config.lr, optimizer="adamw", weight_decay=config.weight_decay,
                      schedule="step", step_decay=config.lr_decay, decay_after=config.decay_after, seed=config.seed)


def train_ffn(normal: torch.Tensor, anomalous: torch.Tensor, config: TrainConfig, progress: bool = True,
              ctx: Any = None, checkpoint: str | Path | None = None) -> tuple[RandWordFFN, list[dict[str, float]]]:
    """Train on pairs (normal[i] label 0, anomalous[i] label 1); returns the FFN in eval mode and per-epoch stats."""
    model, result = _train_ffn(normal, anomalous, config, progress, ctx, checkpoint)
    return model, result.history


def resume_identity(config: TrainConfig, prompts: PromptConfig, backbone: Any) -> dict[str, Any]:
    """What a checkpoint of `inspectd fit randword` must match to be resumed, beyond the loop's own config (lr,
    decay, epochs, seed): the FFN's shape and dropout, the batch size, every prompt setting (the words, the
    template, the random-word lengths and alphabet: they make the training data) and the CLIP whose text encoder
    embedded them (its identity: arch, the weights' content id ``weights_id``, activation, dtype, shapes)."""
    return {"dropout": config.dropout, "batch_size": config.batch_size, "prompts": dataclasses.asdict(prompts),
            "backbone": dict(getattr(backbone, "identity", None) or {})}


def _train_ffn(normal: torch.Tensor, anomalous: torch.Tensor, config: TrainConfig, progress: bool = True,
               ctx: Any = None, checkpoint: str | Path | None = None,
               identity: dict[str, Any] | None = None) -> tuple[RandWordFFN, Any]:
    """`train_ffn` returning the loop's `TrainResult` (history, resumed_from_epoch); ``identity`` adds to what a
    checkpoint must match to be resumed (`resume_identity`)."""
    if normal.shape != anomalous.shape:
        raise ValueError(f"normal {tuple(normal.shape)} and anomalous {tuple(anomalous.shape)} embeddings differ")
    n_pairs, dim = normal.shape
    x = torch.stack([F.normalize(normal.float(), dim=-1), F.normalize(anomalous.float(), dim=-1)], dim=1)
    x = x.reshape(2 * n_pairs, dim)
    y = torch.tensor([0.0, 1.0]).repeat(n_pairs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = RandWordFFN(dim, config.hidden, config.dropout)

    def loss_step(rows: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy_with_logits(model(x[rows]), y[rows])

    def batches(epoch: int, generator: torch.Generator) -> list[torch.Tensor]:
        return pair_batches(n_pairs, config.batch_size, generator)

    result = train(model, loss_step, batches, _loop_config(config), progress=ctx,
                   tqdm_desc="train FFN" if progress else None, checkpoint=checkpoint,
                   identity={"pairs": n_pairs, "dim": dim, "hidden": list(config.hidden), **(identity or {})})
    if result.stopped and ctx is not None:
        ctx.check_stop()
    return model, result


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
    content_hash: str = ""  # sha256 of the artifact file it was loaded from
    identity: dict[str, Any] = field(default_factory=dict)  # the backbone identity it was trained under
    resumed_from_epoch: int = 0  # epochs restored from an interrupted run's checkpoint (0 = a fresh run)

    @property
    def model_id(self) -> str:
        return f"{self.arch}/{self.pretrained}"

    @torch.inference_mode()
    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """s_FNN = sigmoid(FFN(e / |e|)) for embeddings [N, D] (BatchNorm in eval mode)."""
        self.model.eval()
        return torch.sigmoid(self.model(F.normalize(embeddings.float(), dim=-1)))


class FfnBackboneMismatch(ArtifactMismatch):
    """An FFN file was loaded under a CLIP model other than the one whose text encoder trained it."""


def fit_randword_ffn(backbone: Any, prompts: PromptConfig | None = None, train: TrainConfig | None = None,
                     progress: bool = True, ctx: Any = None, checkpoint: str | Path | None = None) -> FfnBundle:
    """Generate N random-word pairs, encode them with ``backbone``, train the FFN (all seeded).

    ``ctx`` (a FitContext) gets progress (encoding is the first 40 %) and may stop the run between steps;
    ``checkpoint`` makes training resumable per epoch.
    """
    prompts = prompts or PromptConfig()
    train = train or TrainConfig()
    pairs = generate_pairs(train.pairs, prompts, train.seed)
    encode_ctx = ctx.section(0.0, 0.4) if ctx is not None else None
    normal = encode_prompts(backbone, [p[0] for p in pairs], train.encode_chunk, progress, "encode normal")
    if encode_ctx is not None:
        encode_ctx.progress(0.5, "encoded normal prompts")
        encode_ctx.check_stop()
    anomalous = encode_prompts(backbone, [p[1] for p in pairs], train.encode_chunk, progress, "encode anomalous")
    model, result = _train_ffn(normal, anomalous, train, progress,
                               ctx.section(0.4, 1.0) if ctx is not None else None, checkpoint,
                               resume_identity(train, prompts, backbone))
    spec = backbone.spec
    return FfnBundle(model, spec.arch, spec.pretrained, int(backbone.embed_dim), prompts, train, result.history,
                     identity=dict(backbone.identity), resumed_from_epoch=result.resumed_from_epoch)


def ffn_artifact(bundle: FfnBundle, backbone_identity: dict[str, Any]) -> Artifact:
    """The FFN (weights + BatchNorm statistics) and its provenance as a learned-part artifact."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    return Artifact(
        kind=LEARNED, detector="randword", detector_version=RANDWORD_VERSION, tensors=tensors,
        backbone=dict(backbone_identity),
        config={"ffn": {"embed_dim": bundle.embed_dim, "hidden": list(bundle.model.hidden),
                        "dropout": bundle.model.dropout},
                "prompts": dataclasses.asdict(bundle.prompts), "train": dataclasses.asdict(bundle.train)},
        training={"data": {"kind": "random-word prompt pairs", "pairs": bundle.train.pairs,
                           "seed": bundle.train.seed,
                           "words": {"normal": bundle.prompts.normal_word, "anomaly": bundle.prompts.anomaly_word,
                                     "object": bundle.prompts.object_word}},
                  "history": bundle.history, "resumed_from_epoch": bundle.resumed_from_epoch},
        meta={"arch": bundle.arch, "pretrained": bundle.pretrained, "model_id": bundle.model_id})


def save_ffn(bundle: FfnBundle, path: str | Path, backbone_identity: dict[str, Any] | None = None) -> Path:
    """Write the FFN as an artifact; ``backbone_identity`` defaults to what the bundle records."""
    identity = backbone_identity or bundle.identity or {
        "arch": bundle.arch, "weights": pretrained_identity(bundle.arch, bundle.pretrained),
        "embed_dim": bundle.embed_dim}
    save_artifact(ffn_artifact(bundle, identity), path)
    return Path(path)


def _tuple_fields(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**kept)


def load_ffn(path: str | Path, backbone: Any | None = None) -> FfnBundle:
    """Read an FFN artifact; with ``backbone`` given, refuse (FfnBackboneMismatch) one trained under another CLIP."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FFN file {path}; write one with `inspectd fit randword --out {path}`")
    artifact = load_artifact(path, kind=LEARNED, detector="randword", detector_version=RANDWORD_VERSION,
                             refit_hint=REFIT_HINT)
    if backbone is not None:
        try:
            check_backbone(artifact.backbone, backbone.identity, where=f"FFN {path}",
                           hint=f"Re-run `inspectd fit randword --arch {backbone.spec.arch} "
                                f"--pretrained {backbone.spec.pretrained} --out FILE`")
        except ArtifactMismatch as exc:
            raise FfnBackboneMismatch(str(exc)) from None
    shape = artifact.config["ffn"]
    model = RandWordFFN(int(shape["embed_dim"]), shape["hidden"], float(shape["dropout"]))
    model.load_state_dict(artifact.tensors)
    model.eval()
    bundle = FfnBundle(model, artifact.meta["arch"], artifact.meta["pretrained"], int(shape["embed_dim"]),
                       _tuple_fields(PromptConfig, artifact.config["prompts"]),
                       _tuple_fields(TrainConfig, artifact.config["train"]), artifact.training.get("history", []))
    bundle.content_hash = artifact.content_hash
    bundle.identity = dict(artifact.backbone)
    bundle.resumed_from_epoch = int(artifact.training.get("resumed_from_epoch", 0))
    return bundle


# ---------------------------------------------------------------------------- `inspectd fit randword`
@dataclass(frozen=True)
class RandWordFitConfig:
    """`inspectd fit randword` flags: the prompts and the FFN's training."""

    pairs: int = 10_000
    epochs: int = 2
    seed: int = 0
    object_word: str = "object"
    normal_word: str = "a"
    anomaly_word: str = "a damaged"
    hidden: tuple[int, ...] = (512, 256, 128)
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128

    help: ClassVar[dict[str, str]] = {
        "pairs": "random-word prompt pairs", "epochs": "training epochs", "seed": "seed of words and training",
        "object_word": "object word of the prompts, or a category name", "hidden": "hidden widths, comma separated",
        "batch_size": "prompts per batch (even: whole pairs)", "lr": "AdamW learning rate",
    }

    def split(self) -> tuple[PromptConfig, TrainConfig]:
        prompts = PromptConfig(normal_word=self.normal_word, anomaly_word=self.anomaly_word,
                               object_word=self.object_word)
        train = TrainConfig(pairs=self.pairs, epochs=self.epochs, seed=self.seed, dropout=self.dropout,
                            hidden=self.hidden, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size)
        return prompts, train

    def __post_init__(self) -> None:
        self.split()  # validates every field (errors name it)


class RandWordTrainer(Trainer):
    """Trains the category-agnostic FFN on CLIP text embeddings of random-word prompts (no image data)."""

    detector = "randword"
    Config = RandWordFitConfig
    data = "none"
    description = ("Generate N random-word prompt pairs, encode them with the CLIP text encoder, train the FFN "
                   "and save it (tied to this CLIP model). Products point to it with `options: {ffn: FILE}`.")

    def train(self, data: TrainingData, ctx: FitContext, checkpoint: Path | None = None,
              show_progress: bool = True) -> Artifact:
        prompts, train = self.config.split()
        loop_checkpoint = None
        if checkpoint is not None:
            checkpoint.mkdir(parents=True, exist_ok=True)
            loop_checkpoint = checkpoint / "loop.safetensors"
        bundle = fit_randword_ffn(self.backbone, prompts, train, show_progress, ctx, loop_checkpoint)
        return ffn_artifact(bundle, self.backbone.identity)
