"""The detector interface, the per-product state, and the registry of detector names.

A detector owns the maths of one method; the backbone is shared. What belongs to one product
(its text prototypes, reference memories, threshold) lives in a `ProductState`, a small set of
named tensors plus JSON metadata that is built by `Detector.fit`, saved as safetensors (never
pickle), loaded, and swapped independently of everything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features

STATE_FORMAT = 1


@dataclass(frozen=True)
class ProductSpec:
    """What a detector needs to know about a product to build its state."""

    product: str
    object_name: str = "object"
    defect_words: tuple[str, ...] = ()


@dataclass
class ProductState:
    """One product's fitted state: named tensors (on the engine's device) and JSON-able metadata."""

    detector: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> ProductState:
        return ProductState(self.detector, {k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        header = {"format": str(STATE_FORMAT), "detector": self.detector, "meta": json.dumps(self.meta)}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        tmp = Path(f"{path}.tmp")
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)  # atomic: a reader never sees a half-written state

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> ProductState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            if header.get("format") != str(STATE_FORMAT):
                raise ValueError(f"{path}: not an inspectd product state (format {header.get('format')!r})")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open API
        return cls(header["detector"], tensors, json.loads(header.get("meta", "{}")))


@dataclass
class DetectorOutput:
    """Per-input (tile) outputs of a detector: image scores [N] and maps [N, S, S] or None."""

    scores: torch.Tensor
    maps: torch.Tensor | None


class Detector(ABC):
    """One anomaly-detection method over the shared CLIP backbone.

    Subclasses set ``name``, an ``Options`` dataclass (validated from the product's config), and
    implement `feature_request`, `fit` and `score`. `score` gets the features of this product's
    tiles only and must treat each row independently (batching never changes a result).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = dataclass(type("NoOptions", (), {}))
    produces_masks: ClassVar[bool] = True

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        self.backbone = backbone
        self.options = build_options(self.Options, options or {}, where=f"detector {self.name!r} options")

    @abstractmethod
    def feature_request(self, state: ProductState) -> FeatureRequest:
        """Which backbone taps scoring with ``state`` needs."""

    @abstractmethod
    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray]) -> ProductState:
        """Build a product's state from its text description and k >= 0 normal RGB reference frames."""

    @abstractmethod
    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        """Score rows of ``features`` (tiles of this product's frames) with the product's state."""

    @property
    def test_time_crops(self) -> int:
        """Extra crop views per tile whose image scores are averaged in (multi-crop TTA); 0 = none."""
        return int(getattr(self.options, "multi_crop", 0))

    def reference_features(self, references: Sequence[np.ndarray], request: FeatureRequest) -> Features | None:
        """Backbone features of all tiles of the reference frames (None when there are none)."""
        if not references:
            return None
        tiles = [self.backbone.preprocessor(image)[0] for image in references]
        return self.backbone.forward(torch.cat(tiles), request)

    def config_fingerprint(self) -> str:
        """A stable hash of this detector's name, options and backbone (keys the state cache)."""
        payload = json.dumps(
            {"detector": self.name, "options": dataclasses.asdict(self.options),
             "model": self.backbone.model_id, "image_size": self.backbone.image_size},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_options(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate an options dataclass, rejecting unknown keys and wrong types by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    converted = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: expected true/false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if default is not None and not isinstance(value, type(default)):
            raise ValueError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        converted[key] = value
    return cls(**converted)


_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"detector name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import inspectd.detectors as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")


def available_detectors() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def detector_class(name: str) -> type[Detector]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; available: {sorted(_REGISTRY)}") from None


def create_detector(name: str, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> Detector:
    return detector_class(name)(backbone, options)
