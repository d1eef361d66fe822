"""The shared training loop: schedules, seeding, stop, safetensors checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from inspectd.detectors.training.loop import (
    CHECKPOINT_FORMAT,
    LoopConfig,
    ProgressSink,
    TrainResult,
    lr_at,
    train,
)

N_ROWS, BATCH, DIM = 48, 8, 6
STEPS = N_ROWS // BATCH  # per epoch


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N_ROWS, DIM, generator=g)
    return x, x @ torch.randn(DIM, 1, generator=g) + 0.1 * torch.randn(N_ROWS, 1, generator=g)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))


def shuffled(epoch: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(N_ROWS, generator=generator).split(BATCH))


def fit(model: nn.Module, config: LoopConfig, **kwargs: Any) -> TrainResult:
    x, y = data()
    return train(model, lambda rows: nn.functional.mse_loss(model(x[rows]), y[rows]), shuffled, config, **kwargs)


class Sink:
    """Records progress; asks to stop once ``stop_after`` steps have run."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.asked = stop_after, 0
        self.fractions: list[float] = []
        self.notes: list[str] = []

    def progress(self, fraction: float, note: str) -> None:
        self.fractions.append(fraction)
        self.notes.append(note)

    def should_stop(self) -> bool:
        self.asked += 1
        return self.stop_after is not None and self.asked > self.stop_after


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CONFIGS = {
    "adamw-cosine-warmup": LoopConfig(epochs=4, lr=1e-2, optimizer="adamw", weight_decay=1e-3, schedule="cosine",
                                      warmup_steps=3, min_lr=1e-4, seed=7),
    "sgd-step-clip": LoopConfig(epochs=4, lr=5e-2, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4,
                                schedule="step", decay_after=(1, 3), step_decay=0.5, grad_clip=0.5, seed=3),
    "adam-constant": LoopConfig(epochs=4, lr=1e-3, optimizer="adam", seed=0),
}


# ----------------------------------------------------------------------------- resume, stop
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stop_then_resume_gives_the_uninterrupted_parameters(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    straight_model = make_model(0)
    straight = fit(straight_model, config)
    assert not straight.stopped and straight.resumed_from_epoch == 0 and len(straight.history) == 4

    ckpt = tmp_path / "run.safetensors"
    first = fit(make_model(0), config, checkpoint=ckpt, progress=Sink(stop_after=2 * STEPS + 3))  # mid-epoch 3
    assert first.stopped and [h["epoch"] for h in first.history] == [1, 2]

    resumed_model = make_model(99)  # a different init: everything must come from the checkpoint
    resumed = fit(resumed_model, config, checkpoint=ckpt)
    assert not resumed.stopped and resumed.resumed_from_epoch == 2
    assert same_state(resumed_model, straight_model)
    assert resumed.history == straight.history
    assert not resumed_model.training  # left in eval mode


def test_stop_keeps_the_last_completed_epoch_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.safetensors"
    sink = Sink(stop_after=STEPS + 2)
    result = fit(make_model(0), CONFIGS["adam-constant"], checkpoint=ckpt, progress=sink)
    assert result.stopped and len(result.history) == 1
    assert sink.asked == STEPS + 3  # asked before every step, stopped before step STEPS + 3
    with safe_open(str(ckpt), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["epoch"] == "1" and json.loads(meta["history"]) == result.history
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file


def test_stop_at_an_epoch_boundary_and_without_a_checkpoint() -> None:
    result = fit(make_model(0), CONFIGS["adam-constant"], progress=Sink(stop_after=2 * STEPS))
    assert result.stopped and [h["epoch"] for h in result.history] == [1, 2]


def test_a_finished_checkpoint_resumes_without_training(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.safetensors"
    config = LoopConfig(epochs=2, lr=1e-2)
    done_model = make_model(0)
    done = fit(done_model, config, checkpoint=ckpt)
    calls = []
    model = make_model(5)
    again = train(model, lambda b: torch.zeros(()), lambda e, g: calls.append(e) or [], config, checkpoint=ckpt)
    assert calls == [] and again.resumed_from_epoch == 2 and again.history == done.history
    assert same_state(model, done_model)
    fresh = fit(make_model(0), config, checkpoint=ckpt, resume=False)  # resume=False trains from scratch
    assert fresh.resumed_from_epoch == 0 and fresh.history == done.history


def test_training_is_seeded_and_leaves_the_global_rng_alone() -> None:
    config = CONFIGS["adamw-cosine-warmup"]
    before = torch.get_rng_state()
    a, b = make_model(0), make_model(0)
    torch.set_rng_state(before)
    ha = fit(a, config).history
    assert torch.equal(torch.get_rng_state(), before)
    hb = fit(b, config).history
    assert ha == hb and same_state(a, b)
    c = make_model(0)
    assert fit(c, LoopConfig(**{**json.loads(config.to_json()), "seed": 8})).history != ha


# ----------------------------------------------------------------------------- checkpoint file
def test_checkpoint_is_safetensors_without_pickle(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.safetensors"
    config = CONFIGS["adamw-cosine-warmup"]
    model = make_model(0)
    fit(model, config, checkpoint=ckpt, identity={"data": "toy", "rows": N_ROWS})
    raw = ckpt.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])  # safetensors: u64 length, JSON header, then raw tensor bytes
    data_end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    assert 8 + header_len + data_end == len(raw)  # nothing else (no pickle, no torch.save zip) in the file
    with safe_open(str(ckpt), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
        rng = handle.get_tensor("rng/torch")
        weight = handle.get_tensor("module/0.weight")
    assert meta["format"] == CHECKPOINT_FORMAT and meta["epoch"] == "4"
    assert LoopConfig.from_json(meta["config"]) == config
    assert json.loads(meta["identity"]) == {"data": "toy", "rows": N_ROWS}
    assert {f"module/{k}" for k in model.state_dict()} <= keys
    assert {"optimizer/0/exp_avg", "optimizer/0/exp_avg_sq", "optimizer/0/step", "rng/generator"} <= keys
    assert rng.dtype == torch.uint8 and torch.equal(weight, model.state_dict()["0.weight"])
    groups = json.loads(meta["optimizer_groups"])
    assert groups[0]["base_lr"] == config.lr and groups[0]["betas"] == [0.9, 0.999]


def test_resume_refuses_a_different_config_naming_the_fields(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.safetensors"
    config = LoopConfig(epochs=2, lr=1e-2, seed=1)
    fit(make_model(0), config, checkpoint=ckpt, progress=Sink(stop_after=STEPS))
    with pytest.raises(ValueError, match="differing fields") as err:
        fit(make_model(0), LoopConfig(epochs=3, lr=2e-2, seed=1), checkpoint=ckpt)
    message = str(err.value)
    assert "epochs: checkpoint 2 != now 3" in message and "lr: checkpoint 0.01 != now 0.02" in message
    assert "seed" not in message and "resume=False" in message
    with pytest.raises(ValueError, match="identity"):
        fit(make_model(0), config, checkpoint=ckpt, identity="other data")
    # checkpoint_every does not change what is computed: resuming with another value is fine
    assert fit(make_model(0), LoopConfig(epochs=2, lr=1e-2, seed=1, checkpoint_every=2),
               checkpoint=ckpt).resumed_from_epoch == 1


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "inspectd-randword-ffn"})
    with pytest.raises(ValueError, match="not a training checkpoint"):
        fit(make_model(0), LoopConfig(epochs=1, lr=1e-2), checkpoint=other)


# ----------------------------------------------------------------------------- schedule
def test_cosine_matches_torch_cosine_annealing() -> None:
    config = LoopConfig(epochs=5, lr=0.002, optimizer="sgd", schedule="cosine", min_lr=1e-5)
    spe = 3
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * spe, eta_min=config.min_lr)
    for step in range(config.epochs * spe):
        assert lr_at(config, step, spe) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_warmup_then_cosine_and_step_decay_values() -> None:
    cosine = LoopConfig(epochs=2, lr=1.0, schedule="cosine", warmup_steps=4)
    spe = 6  # 12 steps: 4 warm-up, 8 cosine
    lrs = [lr_at(cosine, s, spe) for s in range(12)]
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] > 0
    assert lr_at(cosine, 2, spe, base_lr=0.1) == pytest.approx(0.075)
    step = LoopConfig(epochs=4, lr=1.0, schedule="step", decay_after=(1, 3), step_decay=0.1)
    assert [lr_at(step, s, 5) for s in (0, 4, 5, 14, 15, 19)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    constant = LoopConfig(epochs=1, lr=0.3, warmup_steps=2)
    assert [lr_at(constant, s, 4) for s in range(4)] == pytest.approx([0.15, 0.3, 0.3, 0.3])


def test_the_loop_applies_the_schedule_per_step_and_per_group() -> None:
    """With plain SGD and loss = sum(w * scale), each step moves w by exactly -lr * scale."""
    config = LoopConfig(epochs=3, lr=0.5, optimizer="sgd", momentum=0.0, schedule="cosine", warmup_steps=2)
    module = nn.Module()
    module.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
    module.b = nn.Parameter(torch.zeros((), dtype=torch.float64))
    seen: list[tuple[float, float]] = []

    def loss_step(batch: int) -> torch.Tensor:
        seen.append((module.a.item(), module.b.item()))
        return module.a + module.b

    groups = [{"params": [module.a]}, {"params": [module.b], "lr": 0.1}]
    result = train(module, loss_step, lambda e, g: range(4), config, params=groups)
    seen.append((module.a.item(), module.b.item()))
    for step in range(12):
        assert seen[step][0] - seen[step + 1][0] == pytest.approx(lr_at(config, step, 4))
        assert seen[step][1] - seen[step + 1][1] == pytest.approx(lr_at(config, step, 4, base_lr=0.1))
    assert [h["lr"] for h in result.history] == pytest.approx([lr_at(config, s, 4) for s in (3, 7, 11)])
    assert [h["steps"] for h in result.history] == [4, 4, 4]


# ----------------------------------------------------------------------------- progress
def test_progress_fractions_are_monotonic_and_reach_one(tmp_path: Path) -> None:
    sink = Sink()
    assert isinstance(sink, ProgressSink)
    fit(make_model(0), CONFIGS["adam-constant"], progress=sink, tqdm_desc="toy")
    assert len(sink.fractions) == 4 * STEPS
    assert sink.fractions == sorted(sink.fractions) and sink.fractions[-1] == 1.0 and sink.fractions[0] > 0
    assert sink.notes[-1].startswith(f"epoch 4/4 step {STEPS}/{STEPS} loss ")

    ckpt = tmp_path / "run.safetensors"
    fit(make_model(0), CONFIGS["adam-constant"], checkpoint=ckpt, progress=Sink(stop_after=STEPS + 1))
    resumed = Sink()
    fit(make_model(0), CONFIGS["adam-constant"], checkpoint=ckpt, progress=resumed)
    assert resumed.fractions[0] == 0.25 and resumed.notes[0] == "resumed after epoch 1/4"
    assert resumed.fractions == sorted(resumed.fractions) and resumed.fractions[-1] == 1.0


# ----------------------------------------------------------------------------- batches and errors
def test_steps_per_epoch_takes_that_many_from_an_unsized_stream() -> None:
    module = nn.Linear(1, 1)
    taken: list[int] = []

    def stream(epoch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        while True:
            taken.append(epoch)
            yield torch.randn(4, 1, generator=generator)

    result = train(module, lambda x: module(x).pow(2).mean(), stream,
                   LoopConfig(epochs=2, lr=1e-2, steps_per_epoch=3))
    assert [h["steps"] for h in result.history] == [3, 3] and taken == [1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train(module, lambda x: module(x).pow(2).mean(), stream, LoopConfig(epochs=1, lr=1e-2))
    with pytest.raises(ValueError, match="yielded 2 batches, expected 3"):
        train(module, lambda x: module(x).pow(2).mean(), lambda e, g: [torch.ones(1, 1)] * 2,
              LoopConfig(epochs=1, lr=1e-2, steps_per_epoch=3))


def test_loop_errors_are_clear() -> None:
    module = nn.Linear(2, 1)
    batches = lambda e, g: [torch.ones(3, 2)]  # noqa: E731
    with pytest.raises(ValueError, match="not a parameter of the module"):
        train(module, lambda x: module(x).sum(), batches, LoopConfig(epochs=1, lr=1.0),
              params=[nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="nothing to train"):
        train(module.requires_grad_(False), lambda x: module(x).sum(), batches, LoopConfig(epochs=1, lr=1.0))
    module.requires_grad_(True)
    with pytest.raises(ValueError, match="scalar"):
        train(module, lambda x: module(x), batches, LoopConfig(epochs=1, lr=1.0))
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        train(module, lambda x: module(x).sum() * math.inf, batches, LoopConfig(epochs=1, lr=1.0))
    with pytest.raises(ValueError, match="warmup_steps"):
        train(module, lambda x: module(x).sum(), batches, LoopConfig(epochs=2, lr=1.0, warmup_steps=2))
    with pytest.raises(ValueError, match="epoch 2 has 2 batches, earlier epochs 1"):
        train(module, lambda x: module(x).sum(), lambda e, g: [torch.ones(3, 2)] * e, LoopConfig(epochs=2, lr=1.0))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"lr": math.nan}, "lr"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1.0}, "weight_decay"), ({"betas": (0.9,)}, "betas"),
    ({"schedule": "linear"}, "schedule"), ({"warmup_steps": -1}, "warmup_steps"), ({"steps_per_epoch": 0},
                                                                                  "steps_per_epoch"),
    ({"decay_after": (1,)}, "decay_after"), ({"schedule": "step", "decay_after": (0,)}, "decay_after"),
    ({"schedule": "step", "step_decay": 0.0}, "step_decay"), ({"min_lr": 1e-4}, "min_lr"),
    ({"schedule": "cosine", "min_lr": 1.0}, "min_lr"), ({"grad_clip": 0.0}, "grad_clip"),
    ({"checkpoint_every": 0}, "checkpoint_every"), ({"nesterov": True}, "nesterov"), ({"eps": 0.0}, "eps"),
])
def test_config_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"LoopConfig\.{field}\b"):
        LoopConfig(**{"epochs": 2, "lr": 1e-3, **kwargs})


def test_config_json_round_trip() -> None:
    config = LoopConfig(epochs=3, lr=0.1, betas=[0.8, 0.99], schedule="step", decay_after=[2])  # type: ignore[arg-type]
    assert config.betas == (0.8, 0.99) and config.decay_after == (2,)
    assert LoopConfig.from_json(config.to_json()) == config
