"""The Trainer interface: how a detector's offline-learned part is trained and saved (`inspectd fit DETECTOR`).

A detector declares ``learning = Learning(offline=SomeTrainer)``. The trainer names its ``Config``
dataclass (the CLI derives one flag per field, with the field's default and comment-free help from
``Config.help``), the data it needs (``data``: none, a labelled dataset, or many products), and
returns a learned-part `Artifact` that product options point to.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from inspectd.detectors.artifacts import Artifact
from inspectd.detectors.context import FitContext

DATA_KINDS = ("none", "dataset", "products")


@dataclass
class TrainingData:
    """What a trainer trains on: dataset categories (labelled, with masks) or products' references."""

    categories: Sequence[Any] = ()  # data.datasets.Category, for data == "dataset"
    products: Sequence[tuple[Any, Sequence[Any]]] = ()  # (ProductSpec, reference RGB images), data == "products"
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # dataset, root, categories, image count


class Trainer(ABC):
    """Trains one detector's learned part on frozen CLIP features; seeded, stoppable, resumable."""

    detector: ClassVar[str]
    Config: ClassVar[type]
    data: ClassVar[str] = "none"
    description: ClassVar[str] = ""
    default_model: ClassVar[tuple[str, str]] = ("ViT-B-16-plus-240", "laion400m_e31")  # (arch, pretrained)

    def __init__(self, backbone: Any, config: Any) -> None:
        if self.data not in DATA_KINDS:
            raise ValueError(f"{type(self).__name__}.data must be one of {DATA_KINDS}")
        self.backbone = backbone
        self.config = config

    @abstractmethod
    def train(self, data: TrainingData, ctx: FitContext, checkpoint: Path | None = None,
              show_progress: bool = True) -> Artifact:
        """Train and return the learned part as an artifact (the caller saves it)."""


def config_fields(config_cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of each field of a trainer's Config dataclass."""
    hints = typing.get_type_hints(config_cls)
    helps: Mapping[str, str] = getattr(config_cls, "help", {}) or {}
    out = []
    for f in dataclasses.fields(config_cls):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, hints[f.name], default, helps.get(f.name, "")))
    return out


def parse_field(tp: Any, text: str) -> Any:
    """A CLI string as a Config field's type: bool, int, float, str, tuple[int|float|str, ...] (comma list)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return tuple(parse_field(inner, part.strip()) for part in text.split(",") if part.strip())
    if tp is bool:
        lowered = text.lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected true/false, got {text!r}")
        return lowered in ("1", "true", "yes")
    if tp in (int, float, str):
        return tp(text)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if text.lower() in ("", "none") else parse_field(args[0], text)
    raise ValueError(f"unsupported config field type {tp}")
