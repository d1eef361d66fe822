"""Building a product: fit + calibrate -> (state, threshold, calibration record), and the state cache.

The science of turning k references into something that can judge frames lives here, used by the
daemon's registry and by `inspectd eval` alike, so a deployed build can be reproduced offline.
Calibration scores normal views that stand for unseen good parts (the detector's hook decides how)
plus held-out goods, then threshold = quantile(normal scores) + margin; a fixed value overrides.
The cache keys a built product by everything it depends on (detector name and version, options,
backbone weights, learned-part files, product text, threshold policy, reference contents).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspectd.detectors import artifacts
from inspectd.detectors.base import Detector, ProductSpec, ProductState
from inspectd.detectors.context import FitContext
from inspectd.detectors.pipeline import score_images
from inspectd.detectors.preprocess import shifted_views

log = logging.getLogger(__name__)

FIT_SHARE = 0.8  # of a build's progress bar when the fit trains (calibration takes the rest)


class BuildError(ValueError):
    """A product definition or reference set that cannot be built; the old state keeps serving."""


@dataclass(frozen=True)
class ThresholdPolicy:
    """How a product's OK/NG threshold is chosen."""

    value: float | None = None  # fixed threshold; overrides calibration
    quantile: float = 1.0  # of the normal scores
    margin: float = 0.02  # added to the quantile
    default: float = 0.5  # when there is nothing to calibrate on

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise BuildError(f"threshold.quantile must be within [0, 1], got {self.quantile}")


@dataclass
class BuildResult:
    """A built product: the detector's state, its threshold and how the threshold was found."""

    state: ProductState
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def default_calibration_scores(detector: Detector, spec: ProductSpec, references: Sequence[np.ndarray],
                               state: ProductState, ctx: FitContext, has_holdout: bool) -> dict[str, list[float]]:
    """Leave-one-out over k >= 2 references (each against a state fitted on the other k-1: what an unseen
    good part would get, slightly pessimistic), or with k = 1 and no holdout, shifted views of the one
    reference (its own score is 0 by construction) against the full state."""
    refs = list(references)
    if len(refs) >= 2:
        scores: list[float] = []
        for i in range(len(refs)):
            ctx.check_stop()
            held_out = detector.fit(spec, refs[:i] + refs[i + 1:])
            scores += score_images(detector, held_out, [refs[i]])
            ctx.progress((i + 1) / len(refs), "calibrating: leave-one-out")
        return {"leave_one_out": scores}
    if len(refs) == 1 and not has_holdout:
        return {"shifted_views": score_images(detector, state, shifted_views(refs[0]))}
    return {}


def calibrate(detector: Detector, spec: ProductSpec, references: Sequence[np.ndarray],
              holdout: Sequence[np.ndarray], state: ProductState, policy: ThresholdPolicy,
              ctx: FitContext | None = None) -> tuple[float, dict[str, Any]]:
    """(threshold, calibration record) for a fitted ``state``."""
    ctx = ctx or FitContext()
    if policy.value is not None:
        return float(policy.value), {"method": "fixed"}
    has_holdout = len(holdout) > 0
    by_kind = detector.calibration_scores(spec, references, state, ctx.section(0.0, 0.9), has_holdout)
    if by_kind is None:
        by_kind = default_calibration_scores(detector, spec, references, state, ctx.section(0.0, 0.9), has_holdout)
    normal_scores = [s for scores in by_kind.values() for s in scores]
    holdout_scores = score_images(detector, state, list(holdout))  # chunked: bounded memory for large dirs
    normal_scores += holdout_scores
    ctx.progress(1.0, "calibrated")
    if not normal_scores:
        (log.warning if references else log.info)(
            "product %s: no normals to calibrate on (k=%d, no holdout_dir); threshold = default %.3f",
            spec.product, len(references), policy.default)
        return float(policy.default), {"method": "default", "reason": "no normals to calibrate on "
                                       "(needs >= 2 references or a holdout_dir)"}
    threshold = float(np.quantile(normal_scores, policy.quantile)) + policy.margin
    record: dict[str, Any] = {"method": "quantile", "quantile": policy.quantile, "margin": policy.margin,
                              "normals": len(normal_scores), "leave_one_out": 0, "holdout": len(holdout_scores),
                              "shifted_views": 0}
    record.update({kind: len(scores) for kind, scores in by_kind.items()})
    record.update({"min_normal": float(min(normal_scores)), "mean_normal": float(np.mean(normal_scores)),
                   "max_normal": float(max(normal_scores))})
    return threshold, record


def build_product(detector: Detector, spec: ProductSpec, references: Sequence[np.ndarray],
                  holdout: Sequence[np.ndarray] = (), policy: ThresholdPolicy | None = None,
                  ctx: FitContext | None = None) -> BuildResult:
    """Fit the product's state, then calibrate its threshold. Raises FitStopped when ``ctx`` is stopped."""
    ctx = ctx or FitContext()
    policy = policy or ThresholdPolicy()
    trains = detector.learning.per_product == "trained"
    fit_share = FIT_SHARE if trains else 0.3
    ctx.progress(0.0, "fitting")
    state = detector.fit(spec, list(references), ctx.section(0.0, fit_share))
    ctx.check_stop()
    ctx.progress(fit_share, "calibrating")
    threshold, calibration = calibrate(detector, spec, references, holdout, state, policy,
                                       ctx.section(fit_share, 1.0))
    return BuildResult(state, threshold, calibration)


def build_fingerprint(detector: Detector, spec: ProductSpec, policy: ThresholdPolicy, files: Sequence[Path],
                      holdout: Sequence[Path] = (), extra: dict[str, Any] | None = None) -> str:
    """Hash of everything a built product depends on (the state cache's key)."""
    digest = hashlib.sha256()
    digest.update(detector.config_fingerprint().encode())
    text = {"object": spec.object_name, "defects": list(spec.defect_words), "shots": len(files),
            "threshold": asdict(policy), "detector": detector.name, **(extra or {})}
    digest.update(json.dumps(text, sort_keys=True).encode())
    for path in [*files, *holdout]:
        digest.update(path.name.encode())
        digest.update(artifacts.file_hash(path).encode())
    return digest.hexdigest()[:20]


class StateCache:
    """Built products on disk as product-state artifacts, keyed by product id and build fingerprint.

    An unreadable or mismatched file is moved aside (``*.<time>-<id>.unreadable`` + a ``.why`` note; earlier copies
    are kept), never deleted, and never replaced by a failed or stopped build (only a finished build writes). Several
    processes may share the folder: a file another one moved aside first is a miss, as an absent one.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, product_id: str, fingerprint: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in product_id)
        return self.dir / f"{safe}-{fingerprint}.safetensors"

    def checkpoint_dir(self, product_id: str, fingerprint: str) -> Path:
        """Where a training fit of this build keeps its per-epoch checkpoints (resumed after a stop)."""
        return self.path(product_id, fingerprint).with_suffix(".ckpt")

    def load(self, detector: Detector, product_id: str, fingerprint: str) -> BuildResult | None:
        path = self.path(product_id, fingerprint)
        if not path.exists():
            self.misses += 1
            return None
        try:
            state, artifact = detector.load_state(path)
            build = artifact.config.get("build", {})
            if build.get("fingerprint") != fingerprint or "threshold" not in build:
                raise artifacts.ArtifactMismatch(f"{path.name}: build record does not match fingerprint {fingerprint}")
        except Exception as exc:  # noqa: BLE001 - any bad file is rebuilt, never fatal, never deleted
            try:
                moved = artifacts.quarantine(path, str(exc))
            except OSError as move_exc:  # cannot move it (permissions): still only a miss, and the file stays
                log.warning("product %s: cached state %s unusable (%s) and not moved aside (%s); rebuilding",
                            product_id, path.name, exc, move_exc)
            else:
                if moved is None:  # another process sharing the folder moved it aside first
                    log.info("product %s: cached state %s unusable and already moved aside by another process; "
                             "rebuilding", product_id, path.name)
                else:
                    log.warning("product %s: cached state %s unusable (%s); moved to %s, rebuilding", product_id,
                                path.name, exc, moved.name)
            self.misses += 1
            return None
        self.hits += 1
        log.info("product %s: state loaded from cache %s", product_id, path.name)
        return BuildResult(state, float(build["threshold"]), dict(build.get("calibration", {})), fingerprint)

    def store(self, detector: Detector, product_id: str, result: BuildResult) -> None:
        path = self.path(product_id, result.fingerprint)
        record = {"build": {"fingerprint": result.fingerprint, "threshold": result.threshold,
                            "calibration": result.calibration}, "options": asdict(detector.options)}
        try:
            detector.save_state(result.state, path, config=record)
        except OSError as exc:
            log.warning("product %s: cannot write state cache %s: %s", product_id, path, exc)
