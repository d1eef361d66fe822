"""The detector interface, the per-product state, how a detector learns, and the list of detectors.

A detector owns the maths of one method; the backbone is shared. What belongs to one product
(its text prototypes, reference memories, learned prompts) lives in a `ProductState`, named
tensors plus JSON metadata, built by `Detector.fit` and saved as an artifact (`artifacts.py`).
A detector *declares* how it learns (`Learning`): fitted in seconds from k references, trained per
product in the background, and/or with a part trained offline by its `Trainer` (`inspectd fit`).

How to add a detector (a newcomer's checklist):
1. Write `inspectd/detectors/<name>.py` (or a package `<name>/`) with a `Detector` subclass: set
   ``name``, ``version`` (bump it whenever the maths changes: cached states of older versions are
   then rebuilt), an ``Options`` dataclass (validated from the product's ``options:``), and
   implement `feature_request`, `fit` and `score`; decorate it with `@register_detector`.
2. Override `input_spec` for an input other than WinCLIP-style tiling at the model's size, e.g.
   ``InputSpec(size=518, mode="square")``; ``feature_request`` may ask for a tower variant.
3. Declare ``learning``: ``Learning(per_product="trained")`` when `fit` runs a training loop (use
   `training.loop.train` with the `FitContext` it is given: progress, stop and checkpoints then work in
   the daemon), and/or ``Learning(offline=MyTrainer)`` for a part trained by `inspectd fit <name>`
   and saved with `artifacts.save_artifact` (list the option naming that file in ``artifact_options``).
   A training method should override `calibration_scores` (the default re-fits k times).
4. Add one line to `DETECTOR_MODULES` below, and tests under `tests/`. Engine, registry, eval and
   the CLI pick it up from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from inspectd.detectors import artifacts
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features
from inspectd.detectors.context import FitContext
from inspectd.detectors.preprocess import INPUT_MODES, MAX_CROPS, InputSpec, Preprocessor

if TYPE_CHECKING:
    from inspectd.detectors.training.trainer import Trainer

# name -> module (or package) defining it; imported on first use, so listing costs nothing
DETECTOR_MODULES: dict[str, str] = {
    "winclip": "inspectd.detectors.winclip",
    "randword": "inspectd.detectors.randword",
    "aprilgan": "inspectd.detectors.aprilgan",
    "promptad": "inspectd.detectors.promptad",
    "anople": "inspectd.detectors.anople",
    "anople-star": "inspectd.detectors.anople",
}


@dataclass(frozen=True)
class ProductSpec:
    """What a detector needs to know about a product to build its state."""

    product: str
    object_name: str = "object"
    defect_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Learning:
    """How a detector learns; the runtime reads this and never guesses.

    per_product: "fitted" -- `fit` builds memories from the references in seconds (WinCLIP+);
                 "trained" -- `fit` runs a training loop: the daemon runs it in the background with
                 progress, stop and per-epoch checkpoints (PromptAD's prompts).
    offline:     a `Trainer` for a part learned before any product exists (`inspectd fit NAME`):
                 on labelled data, many products, or none (randword's FFN on random-word prompts).
    """

    per_product: str = "fitted"
    offline: type[Trainer] | None = None

    def __post_init__(self) -> None:
        if self.per_product not in ("fitted", "trained"):
            raise ValueError(f"Learning.per_product must be 'fitted' or 'trained', not {self.per_product!r}")


@dataclass
class ProductState:
    """One product's fitted state: named tensors (on the engine's device) and the detector's JSON metadata."""

    detector: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> ProductState:
        return ProductState(self.detector, {k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))


@dataclass
class DetectorOutput:
    """Per-input (tile) outputs of a detector: image scores [N] and maps [N, S, S] or None."""

    scores: torch.Tensor
    maps: torch.Tensor | None


class Detector(ABC):
    """One anomaly-detection method over the shared CLIP backbone.

    Subclasses set ``name``, ``version``, an ``Options`` dataclass (validated from the product's
    config), declare ``learning``, and implement `feature_request`, `fit` and `score`. `score` gets
    the features of this product's inputs only and must treat each row independently (batching
    never changes a result).
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1  # part of every cache key: bump when the maths changes
    Options: ClassVar[type] = dataclass(type("NoOptions", (), {}))
    produces_masks: ClassVar[bool] = True
    learning: ClassVar[Learning] = Learning()
    artifact_options: ClassVar[tuple[str, ...]] = ()  # options naming learned-part files (content-hashed)
    # inputs one reference may need after tiling: decode.max_tiles (the daemon's registry sets its own; 16 is the
    # default); a 1 x 10000 strip would be ~12,500 tiles, several GB in one forward
    max_reference_tiles: int = 16

    def __init__(self, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> None:
        self.backbone = backbone
        self.options = build_options(self.Options, options or {}, where=f"detector {self.name!r} options")

    # ------------------------------------------------------------------ input
    def input_spec(self) -> InputSpec:
        """How frames become model inputs: WinCLIP tiling at the model's size unless overridden."""
        return InputSpec(self.backbone.image_size, "tile")

    @property
    def preprocessor(self) -> Preprocessor:
        return self.backbone.preprocessor_for(self.input_spec())

    # ------------------------------------------------------------------ learned-part files
    def load_learned(self) -> None:
        """Load the files the ``artifact_options`` name now. A build calls it before its fingerprint, so no frame
        waits for a file and the parts served are the ones the fingerprint (and a cached state) was made with,
        even if a file is rewritten later. Default: nothing to load."""
        return None

    def loaded_hash(self, option: str) -> str | None:
        """The content hash of the file loaded for artifact option ``option``; None when it is not loaded."""
        return None

    # ------------------------------------------------------------------ the method
    @abstractmethod
    def feature_request(self, state: ProductState) -> FeatureRequest:
        """Which backbone taps (and tower variant) scoring with ``state`` needs."""

    @abstractmethod
    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None
            ) -> ProductState:
        """Build a product's state from its text description and k >= 0 normal RGB reference frames."""

    @abstractmethod
    def score(self, features: Features, state: ProductState) -> DetectorOutput:
        """Score rows of ``features`` (inputs of this product's frames) with the product's state."""

    def mask_scale(self, state: ProductState) -> float:
        """The largest value this detector's maps take for ``state`` (a published 8-bit mask maps it to 255);
        1.0 for maps of probabilities or distances in [0, 1]."""
        return 1.0

    def tower_inputs(self, state: ProductState) -> dict[str, torch.Tensor]:
        """Per-product tensors the requested tower variant needs, each [1, ...] (repeated over the product's
        rows), e.g. {"visual_prompts": [1, J, P, W]}. Plain towers need none."""
        return {}

    @property
    def test_time_crops(self) -> int:
        """Extra crop views per tile whose image scores are averaged in (multi-crop TTA); 0 = none."""
        return int(getattr(self.options, "multi_crop", 0))

    def calibration_scores(self, spec: ProductSpec, references: Sequence[np.ndarray], state: ProductState,
                           ctx: FitContext, has_holdout: bool) -> dict[str, list[float]] | None:
        """Scores of normal views standing for unseen good parts, by how they were made; None = the default.

        The default (`building.default_calibration_scores`, right for fitted methods where a fit costs
        seconds): leave-one-out over k >= 2 references, each scored against a state fitted on the other
        k-1; with k = 1 and no holdout, shifted views of the one reference. A training method overrides
        this (k re-trainings are too dear), e.g. scoring augmented views of the references against ``state``.
        """
        return None

    def reference_features(self, references: Sequence[np.ndarray], request: FeatureRequest) -> Features | None:
        """Backbone features of all inputs (tiles) of the reference frames (None when there are none); a reference
        needing more than ``max_reference_tiles`` inputs is refused (ValueError) before it is resized."""
        if not references:
            return None
        preprocess = self.preprocessor
        for index, image in enumerate(references):
            height, width = image.shape[:2]
            needed = preprocess.layout(height, width).n_tiles
            if needed > self.max_reference_tiles:
                raise ValueError(f"reference image {index + 1} of {len(references)} ({width}x{height}) needs {needed} "
                                 f"inputs of {preprocess.size} px > {self.max_reference_tiles}, the most a reference "
                                 "may need (decode.max_tiles' default): crop it to the part's aspect ratio")
        tiles = [preprocess(image)[0] for image in references]
        return self.backbone.forward(torch.cat(tiles), request)

    # ------------------------------------------------------------------ identity and saving
    def config_fingerprint(self) -> str:
        """A stable hash of what a state depends on: detector name + version, options, input, the backbone's
        identity (the weights' content, the activation it runs and its dtype included) and the contents of
        learned-part files (keys the state cache)."""
        learned = {}
        for option in self.artifact_options:
            value = getattr(self.options, option, "")
            if value:
                path = Path(value).expanduser()
                learned[option] = self.loaded_hash(option) or (
                    artifacts.file_hash(path) if path.is_file() else "missing")
        depends = {"detector": self.name, "version": self.version, "options": dataclasses.asdict(self.options),
                   "backbone": self.backbone.identity,  # (its weights_id keys the weights' content)
                   "input": dataclasses.asdict(self.input_spec()), "learned": learned}
        if self.preprocessor.resize != "exact":  # model.resize: fast fits other tiles (exact keeps its old hashes)
            depends["resize"] = self.preprocessor.resize
        payload = json.dumps(depends, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def state_artifact(self, state: ProductState, config: Mapping[str, Any] | None = None,
                       training: Mapping[str, Any] | None = None) -> artifacts.Artifact:
        return artifacts.Artifact(artifacts.PRODUCT_STATE, self.name, self.version, dict(state.tensors),
                                  backbone=self.backbone.identity, config=dict(config or {}),
                                  training=dict(training or {}), meta=dict(state.meta))

    def save_state(self, state: ProductState, path: str | Path, **header: Mapping[str, Any]) -> str:
        """Save ``state`` as a product-state artifact; returns its content hash."""
        return artifacts.save_artifact(self.state_artifact(state, **header), path)

    def load_state(self, path: str | Path, device: torch.device | str = "cpu") -> tuple[ProductState,
                                                                                         artifacts.Artifact]:
        """Load a state this detector (same name, version and backbone) wrote; ArtifactMismatch otherwise."""
        artifact = artifacts.load_artifact(path, device, kind=artifacts.PRODUCT_STATE, detector=self.name,
                                           detector_version=self.version, backbone=self.backbone.identity,
                                           refit_hint="rebuild the product (delete the cached state)")
        return ProductState(self.name, artifact.tensors, artifact.meta), artifact


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


# how an Options class's own checks (`__post_init__`) name the place: replaced by the key path a caller gives
_OWN_WHERE = re.compile(r"^detector '[^']*' options(?:\.(?P<key>\w+)\b:?)?:?\s*")


# Checks several detectors' options share (``where``: "detector '<name>' options", which `build_options` turns into
# the option's key path)
def check_eps(where: str, eps: float) -> None:
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"{where}.eps must be within (0, 1), got {eps}")


def check_memory_layers(where: str, layers: Sequence[int]) -> None:
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in layers):
        raise ValueError(f"{where}.memory_layers must be 1-based block numbers, got {list(layers)}")


def check_input_mode(where: str, mode: str) -> None:
    if mode not in INPUT_MODES:
        raise ValueError(f"{where}.input_mode must be square or tile, not {mode!r}")


def check_multi_crop(where: str, crops: int) -> None:
    if isinstance(crops, bool) or not 0 <= crops <= MAX_CROPS:
        raise ValueError(f"{where}.multi_crop must be 0 (off) to {MAX_CROPS} crops, got {crops}")


def build_options(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate an options dataclass, rejecting unknown keys, wrong types and the class's own checks
    (`__post_init__`) by their key path under ``where``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    converted = {}
    for key, value in values.items():
        default = _field_default(fields[key])  # (not cls(): its own checks may refuse the defaults alone)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: expected true/false, got {value!r}")
        if isinstance(value, bool) and not isinstance(default, bool) and default is not None:
            # (a bool is an int to isinstance: `steps: yes` would train 1 step)
            raise ValueError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if default is not None and not isinstance(value, type(default)):
            raise ValueError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        converted[key] = value
    try:
        return cls(**converted)
    except ValueError as exc:
        message = str(exc)
        own = _OWN_WHERE.match(message)
        if own is None:
            raise ValueError(f"{where}: {message}") from None
        path = f"{where}.{own['key']}" if own["key"] else where
        raise ValueError(f"{path}: {message[own.end():]}") from None


_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name`` (its module is listed in DETECTOR_MODULES)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"detector name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_detectors() -> list[str]:
    return sorted(set(DETECTOR_MODULES) | set(_REGISTRY))


def detector_class(name: str) -> type[Detector]:
    if name not in _REGISTRY and name in DETECTOR_MODULES:
        importlib.import_module(DETECTOR_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; available: {available_detectors()}") from None


def create_detector(name: str, backbone: ClipBackbone, options: Mapping[str, Any] | None = None) -> Detector:
    return detector_class(name)(backbone, options)
