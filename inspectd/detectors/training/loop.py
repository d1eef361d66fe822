"""The one training loop for learned detectors: optimiser, per-step LR schedule, seeding, stop and resume.

``train`` runs ``epochs`` passes of ``loss_step`` over the batches a factory makes per epoch, with the optimiser
and schedule of a `LoopConfig`. It is seeded (torch's global RNG for dropout and the like, plus a
``torch.Generator`` handed to the batch factory), stops cleanly between steps when a `ProgressSink` asks, and
after completed epochs writes a checkpoint that resumes to exactly the parameters of an uninterrupted run.

Checkpoints are one safetensors file (no pickle): the module's ``state_dict`` under ``module/``, the optimiser's
tensors under ``optimizer/<param>/<name>``, RNG states as uint8 tensors under ``rng/``, and in the JSON metadata
the optimiser's param groups and scalar state, the epoch, the history and the `LoopConfig`.

Randomness that should resume exactly must come from the batch factory's generator or torch's global RNG;
Python's ``random`` and NumPy are neither seeded nor checkpointed here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from inspectd import atomic

CHECKPOINT_FORMAT = "inspectd-train-checkpoint"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
# Fields that may differ between a checkpoint and the resuming run: they do not change what is computed.
RESUME_NEUTRAL_FIELDS = frozenset({"checkpoint_every"})


@dataclass(frozen=True)
class LoopConfig:
    """Optimiser, schedule and bookkeeping for `train` (all of it JSON-able, stored in checkpoints).

    Schedules are per optimiser step. ``warmup_steps`` W ramps every group's lr linearly, step i (0-based)
    using ``base * (i + 1) / W``; after it, "constant" keeps ``base``, "cosine" anneals from ``base`` to
    ``min_lr`` over the remaining steps (torch's ``CosineAnnealingLR`` with ``T_max`` = those steps) and
    "step" multiplies by ``step_decay`` once for each epoch in ``decay_after`` that has finished.
    """

    epochs: int
    lr: float
    steps_per_epoch: int | None = None  # None: len() of each epoch's batches; else exactly this many per epoch
    optimizer: str = "adamw"  # "adam" | "adamw" | "sgd"
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # L2 for adam/sgd, decoupled for adamw
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw only
    eps: float = 1e-8  # adam/adamw only
    schedule: str = "constant"  # "constant" | "cosine" | "step"
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine only: the floor (torch's eta_min)
    step_decay: float = 0.1  # step only: lr factor applied after each epoch in decay_after
    decay_after: tuple[int, ...] = ()  # step only: 1-based epochs
    grad_clip: float | None = None  # max global grad norm, None = no clipping
    seed: int = 0
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always written)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "decay_after", tuple(int(d) for d in self.decay_after))
        for problem in _config_problems(self):
            raise ValueError(f"LoopConfig.{problem}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoopConfig:
        return cls(**json.loads(text))


def _config_problems(c: LoopConfig) -> Iterator[str]:
    """Messages (each starting with the field name) for invalid values; `LoopConfig` raises the first."""
    if c.epochs < 1:
        yield f"epochs must be >= 1, got {c.epochs}"
    if c.steps_per_epoch is not None and c.steps_per_epoch < 1:
        yield f"steps_per_epoch must be None or >= 1, got {c.steps_per_epoch}"
    if not (math.isfinite(c.lr) and c.lr > 0):
        yield f"lr must be a finite number > 0, got {c.lr}"
    if c.optimizer not in OPTIMIZERS:
        yield f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}"
    if not 0.0 <= c.momentum < 1.0:
        yield f"momentum must be in [0, 1), got {c.momentum}"
    if c.nesterov and (c.optimizer != "sgd" or c.momentum == 0):
        yield "nesterov needs optimizer='sgd' with momentum > 0"
    if c.weight_decay < 0:
        yield f"weight_decay must be >= 0, got {c.weight_decay}"
    if len(c.betas) != 2 or not all(0.0 <= b < 1.0 for b in c.betas):
        yield f"betas must be two values in [0, 1), got {c.betas}"
    if c.eps <= 0:
        yield f"eps must be > 0, got {c.eps}"
    if c.schedule not in SCHEDULES:
        yield f"schedule must be one of {SCHEDULES}, got {c.schedule!r}"
    if c.warmup_steps < 0:
        yield f"warmup_steps must be >= 0, got {c.warmup_steps}"
    if not 0.0 <= c.min_lr <= c.lr:
        yield f"min_lr must be in [0, lr={c.lr}], got {c.min_lr}"
    if c.min_lr and c.schedule != "cosine":
        yield f"min_lr only applies to schedule='cosine' (schedule is {c.schedule!r})"
    if c.step_decay <= 0:
        yield f"step_decay must be > 0, got {c.step_decay}"
    if any(d < 1 for d in c.decay_after):
        yield f"decay_after holds 1-based epoch numbers, got {c.decay_after}"
    if c.decay_after and c.schedule != "step":
        yield f"decay_after only applies to schedule='step' (schedule is {c.schedule!r})"
    if c.grad_clip is not None and not c.grad_clip > 0:
        yield f"grad_clip must be None or > 0, got {c.grad_clip}"
    if c.checkpoint_every < 1:
        yield f"checkpoint_every must be >= 1, got {c.checkpoint_every}"


@runtime_checkable
class ProgressSink(Protocol):
    """Where `train` reports progress and asks whether to stop (the daemon's FitContext is one)."""

    def progress(self, fraction: float, note: str) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class TrainResult:
    """What `train` did: one history row per completed epoch (including those before a resume)."""

    history: list[dict[str, float]] = field(default_factory=list)  # epoch, loss (mean over steps), lr, steps
    stopped: bool = False  # should_stop() ended it early; the module then holds a partial epoch's updates
    resumed_from_epoch: int = 0  # epochs restored from the checkpoint (0 = a fresh start)


ParamSpec = Iterable[torch.Tensor] | Iterable[Mapping[str, Any]]


# ---------------------------------------------------------------------------- schedule, optimiser
def lr_at(config: LoopConfig, step: int, steps_per_epoch: int, base_lr: float | None = None) -> float:
    """The learning rate of optimiser step ``step`` (0-based over the whole run) for a group with ``base_lr``."""
    base = config.lr if base_lr is None else base_lr
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.schedule == "step":
        epoch = step // steps_per_epoch + 1
        return base * config.step_decay ** sum(d < epoch for d in config.decay_after)
    if config.schedule == "cosine":
        span = config.epochs * steps_per_epoch - config.warmup_steps
        floor = min(config.min_lr, base)
        return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup_steps) / span))
    return base


def _param_groups(module: nn.Module, params: ParamSpec | None, config: LoopConfig) -> list[dict[str, Any]]:
    """Optimiser groups, each with ``base_lr`` (the schedule scales it); every tensor must be the module's."""
    items: list[Any] = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
    if not items:
        raise ValueError("nothing to train: no parameters given and none of the module's has requires_grad")
    groups = [dict(item) for item in items] if items and isinstance(items[0], Mapping) else [{"params": items}]
    owned = {id(p) for p in module.parameters()}
    for i, group in enumerate(groups):
        group["params"] = list(group["params"])
        if not group["params"]:
            raise ValueError(f"parameter group {i} is empty")
        if any(id(p) not in owned for p in group["params"]):
            raise ValueError(f"parameter group {i} holds a tensor that is not a parameter of the module; "
                             "the checkpoint (the module's state_dict) would not restore it")
        group["base_lr"] = float(group.get("lr", config.lr))
    return groups


def build_optimizer(groups: list[dict[str, Any]], config: LoopConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.nesterov)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------- checkpoints
def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in module.state_dict().values() if t.device.type == "cuda"})


def _rng_tensors(generator: torch.Generator, cuda_devices: Sequence[int]) -> dict[str, torch.Tensor]:
    states = {"rng/torch": torch.get_rng_state(), "rng/generator": generator.get_state()}
    states.update({f"rng/cuda/{d}": torch.cuda.get_rng_state(d) for d in cuda_devices})
    return states


def _restore_rng(tensors: Mapping[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    generator.set_state(tensors["rng/generator"])
    for key, state in tensors.items():
        if key.startswith("rng/cuda/"):
            torch.cuda.set_rng_state(state, int(key.rsplit("/", 1)[1]))


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any], list]:
    """Optimiser state -> (tensors ``optimizer/<param>/<name>``, non-tensor state, param groups) without pickle."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, scalars, state_dict["param_groups"]


def _join_optimizer(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Mapping[str, Any]],
                    groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        state.setdefault(int(index), {}).update(values)
    # JSON turned tuples (betas) into lists; torch's optimisers expect what they were built with.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


@dataclass
class _Checkpoint:
    epoch: int
    steps_per_epoch: int
    history: list[dict[str, float]]
    config: dict[str, Any]
    identity: Any
    base_lrs: list[float]
    module: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]


def save_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    config: LoopConfig, epoch: int, steps_per_epoch: int, history: list[dict[str, float]],
                    identity: Any = None) -> Path:
    """Write the state after ``epoch`` atomically (a temporary file, then ``os.replace``)."""
    from safetensors.torch import save_file

    tensors = {f"module/{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    opt_tensors, opt_scalars, groups = _split_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors.update(_rng_tensors(generator, _cuda_devices(module)))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "epoch": str(epoch),
        "steps_per_epoch": str(steps_per_epoch),
        "history": json.dumps(history),
        "config": config.to_json(),
        "identity": json.dumps(identity, sort_keys=True),
        "optimizer_groups": json.dumps(groups, default=_json_value),
        "optimizer_scalars": json.dumps(opt_scalars, default=_json_value),
    }
    with atomic.replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_checkpoint(path: Path) -> _Checkpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open API
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a training checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != str(CHECKPOINT_VERSION):
        raise ValueError(f"{path}: checkpoint format version {meta.get('format_version')!r}; this inspectd reads "
                         f"{CHECKPOINT_VERSION}")
    groups = json.loads(meta["optimizer_groups"])
    return _Checkpoint(
        epoch=int(meta["epoch"]),
        steps_per_epoch=int(meta["steps_per_epoch"]),
        history=json.loads(meta["history"]),
        config=json.loads(meta["config"]),
        identity=json.loads(meta["identity"]),
        base_lrs=[g["base_lr"] for g in groups],
        module={k.removeprefix("module/"): v for k, v in tensors.items() if k.startswith("module/")},
        optimizer=_join_optimizer({k: v for k, v in tensors.items() if k.startswith("optimizer/")},
                                  json.loads(meta["optimizer_scalars"]), groups),
        rng={k: v for k, v in tensors.items() if k.startswith("rng/")},
    )


def _check_resumable(path: Path, ckpt: _Checkpoint, config: LoopConfig, identity: Any,
                     groups: list[dict[str, Any]]) -> None:
    """Refuse a checkpoint written by a differently configured run, naming what differs."""
    ours = json.loads(config.to_json())
    diffs = [f"{k}: checkpoint {ckpt.config.get(k)!r} != now {ours.get(k)!r}"
             for k in sorted(set(ours) | set(ckpt.config))
             if k not in RESUME_NEUTRAL_FIELDS and ckpt.config.get(k) != ours.get(k)]
    now = json.loads(json.dumps(identity, sort_keys=True))
    if ckpt.identity != now:
        diffs += [f"{where}: checkpoint {old!r} != now {new!r}" for where, old, new in _differences(
            "identity", ckpt.identity, now)]
    base_lrs = [g["base_lr"] for g in groups]
    if ckpt.base_lrs != base_lrs:
        diffs.append(f"parameter group lrs: checkpoint {ckpt.base_lrs} != now {base_lrs}")
    if diffs:
        raise ValueError(f"{path} was written by a different training run; differing fields: " + "; ".join(diffs)
                         + ". Delete the checkpoint or pass resume=False to start over.")


def _differences(where: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for each leaf that differs between two JSON values (dicts compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
                for d in _differences(f"{where}.{k}", old.get(k), new.get(k))]
    return [(where, old, new)] if old != new else []


# ---------------------------------------------------------------------------- the loop
def _epoch_batches(batches: Iterable[Any], config: LoopConfig, epoch: int) -> tuple[Iterable[Any], int]:
    """The epoch's batches and their count (``steps_per_epoch``, or the iterable's ``len``)."""
    if config.steps_per_epoch is not None:
        return islice(batches, config.steps_per_epoch), config.steps_per_epoch
    try:
        return batches, len(batches)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"epoch {epoch}'s batches have no len(); set LoopConfig.steps_per_epoch") from None


class _Run:
    """Mutable state of one `train` call (kept out of the function to keep each piece small)."""

    def __init__(self, config: LoopConfig, sink: ProgressSink | None, tqdm_desc: str | None) -> None:
        self.config, self.sink, self.tqdm_desc = config, sink, tqdm_desc
        self.bar: Any = None  # opened once the run's length is known
        self.steps_per_epoch: int | None = None
        self.step = 0  # optimiser steps done over the whole run

    @property
    def total(self) -> int:
        return self.config.epochs * (self.steps_per_epoch or 0)

    def set_steps_per_epoch(self, n: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"epoch {epoch} has no batches")
        if self.steps_per_epoch is not None and n != self.steps_per_epoch:
            raise ValueError(f"epoch {epoch} has {n} batches, earlier epochs {self.steps_per_epoch}; the schedule "
                             "needs a fixed count (set LoopConfig.steps_per_epoch)")
        if self.steps_per_epoch is None and self.config.warmup_steps >= self.config.epochs * n:
            raise ValueError(f"LoopConfig.warmup_steps ({self.config.warmup_steps}) must be less than the run's "
                             f"{self.config.epochs * n} steps")
        if self.steps_per_epoch is None and self.tqdm_desc is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.config.epochs * n, initial=self.step, desc=self.tqdm_desc, unit="step")
        self.steps_per_epoch = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(self.config, self.step, self.steps_per_epoch, group["base_lr"])
        return optimizer.param_groups[0]["lr"]

    def report(self, epoch: int, done: int, loss: float) -> None:
        note = f"epoch {epoch}/{self.config.epochs} step {done}/{self.steps_per_epoch} loss {loss:.4f}"
        if self.sink is not None:
            self.sink.progress(self.step / self.total, note)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")


def _run_epoch(run: _Run, epoch: int, module: nn.Module, optimizer: torch.optim.Optimizer,
               loss_step: Callable[[Any], torch.Tensor], batches: Iterable[Any]) -> dict[str, float] | None:
    """One epoch's steps and its history row; None when the sink asked to stop before a step."""
    config = run.config
    params = [p for g in optimizer.param_groups for p in g["params"]]
    module.train()
    total, done, lr = 0.0, 0, 0.0
    for batch in batches:
        if run.sink is not None and run.sink.should_stop():
            return None
        lr = run.set_lr(optimizer)
        loss = loss_step(batch)
        if loss.dim() != 0:
            raise ValueError(f"loss_step must return a scalar loss, got shape {tuple(loss.shape)}")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at epoch {epoch}, step {done + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        total, done, run.step = total + value, done + 1, run.step + 1
        run.report(epoch, done, total / done)
    if done != run.steps_per_epoch:
        raise ValueError(f"epoch {epoch} yielded {done} batches, expected {run.steps_per_epoch}")
    return {"epoch": epoch, "loss": total / done, "lr": lr, "steps": done}


def train(module: nn.Module, loss_step: Callable[[Any], torch.Tensor],
          batches: Callable[[int, torch.Generator], Iterable[Any]], config: LoopConfig, *,
          params: ParamSpec | None = None, progress: ProgressSink | None = None, tqdm_desc: str | None = None,
          checkpoint: str | Path | None = None, resume: bool = True, identity: Any = None) -> TrainResult:
    """Fit ``module`` by minimising ``loss_step(batch)`` over ``batches(epoch, generator)`` for each epoch.

    ``module``: what is trained *and* checkpointed (its whole ``state_dict``, buffers included), so pass the
    trainable part (adapters, prompt learner, head), not a frozen CLIP around it. ``params``: the tensors to
    optimise, or torch-style param groups (dicts with ``params`` and optionally ``lr``/``weight_decay``, the
    schedule scaling each group's own ``lr``); default: the module's parameters with ``requires_grad``.
    ``batches`` gets the 1-based epoch and the run's seeded ``torch.Generator`` (draw shuffles from it).
    ``progress``: any object with ``progress(fraction, note)`` and ``should_stop()``; stop is checked before every
    step. ``tqdm_desc``: show a tqdm bar with that label. ``checkpoint``: a safetensors path written after every
    ``checkpoint_every``-th and the last epoch; with ``resume`` an existing one is loaded and training continues
    from the next epoch (a checkpoint from another config or ``identity`` — any JSON-able description of the
    data/model the caller wants checked — is refused). The module is left in eval mode.
    """
    path = Path(checkpoint) if checkpoint is not None else None
    groups = _param_groups(module, params, config)
    optimizer = build_optimizer(groups, config)
    result = TrainResult()
    run = _Run(config, progress, tqdm_desc)
    with torch.random.fork_rng(devices=_cuda_devices(module)):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        try:
            _fit(run, module, optimizer, generator, loss_step, batches, path, resume, identity, result)
        finally:
            run.close()
    module.eval()
    return result


def _fit(run: _Run, module: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
         loss_step: Callable[[Any], torch.Tensor], batches: Callable[[int, torch.Generator], Iterable[Any]],
         path: Path | None, resume: bool, identity: Any, result: TrainResult) -> None:
    """`train`'s body inside its RNG fork: optional resume, then the remaining epochs with checkpoints."""
    config = run.config
    if path is not None and resume and path.is_file():
        _resume(run, path, module, optimizer, generator, identity, result)
    for epoch in range(result.resumed_from_epoch + 1, config.epochs + 1):
        epoch_batches, count = _epoch_batches(batches(epoch, generator), config, epoch)
        run.set_steps_per_epoch(count, epoch)
        row = _run_epoch(run, epoch, module, optimizer, loss_step, epoch_batches)
        if row is None:
            result.stopped = True
            return
        result.history.append(row)
        if path is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
            save_checkpoint(path, module, optimizer, generator, config, epoch, count, result.history, identity)


def _resume(run: _Run, path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, identity: Any, result: TrainResult) -> None:
    """Load module, optimiser, RNG states and history from ``path`` (refusing another run's checkpoint)."""
    ckpt = load_checkpoint(path)
    _check_resumable(path, ckpt, run.config, identity, optimizer.param_groups)
    module.load_state_dict(ckpt.module)
    optimizer.load_state_dict(ckpt.optimizer)
    _restore_rng(ckpt.rng, generator)
    run.step = ckpt.epoch * ckpt.steps_per_epoch
    run.set_steps_per_epoch(ckpt.steps_per_epoch, ckpt.epoch)
    result.history, result.resumed_from_epoch = list(ckpt.history), ckpt.epoch
    if run.sink is not None:
        run.sink.progress(run.step / run.total, f"resumed after epoch {ckpt.epoch}/{run.config.epochs}")
