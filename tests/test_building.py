"""Building a product (fit + calibrate), the calibration hook, and the state cache's keys and safety rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.detectors.artifacts import ArtifactMismatch
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.building import (
    BuildError,
    StateCache,
    ThresholdPolicy,
    build_fingerprint,
    build_product,
)
from inspectd.detectors.winclip import WinClip

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"
SPEC = ProductSpec("nut", "hazelnut")


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(HAZELNUT / name).convert("RGB").resize((128, 128)))


class CountingWinClip(WinClip):
    """WinCLIP that counts fits and (optionally) calibrates like a training method would: no re-fits."""

    name = "test-counting-winclip"
    fits = 0
    own_calibration = False

    def fit(self, spec, references, ctx=None):  # noqa: ANN001, ANN201
        type(self).fits += 1
        return super().fit(spec, references, ctx)

    def calibration_scores(self, spec, references, state, ctx, has_holdout):  # noqa: ANN001, ANN201
        if not self.own_calibration:
            return None
        from inspectd.detectors.pipeline import score_images
        from inspectd.detectors.preprocess import shifted_views

        return {"augmented_views": score_images(self, state, [v for r in references for v in shifted_views(r)])}


def test_default_calibration_is_leave_one_out(tiny_backbone) -> None:
    det = CountingWinClip(tiny_backbone)
    CountingWinClip.fits = 0
    result = build_product(det, SPEC, [rgb("good/00.png"), rgb("good/01.png"), rgb("good/02.png")])
    assert CountingWinClip.fits == 1 + 3  # the state, then one per left-out reference
    assert result.calibration["method"] == "quantile" and result.calibration["leave_one_out"] == 3
    assert result.threshold == pytest.approx(result.calibration["max_normal"] + 0.02)


def test_a_training_method_calibrates_without_refitting(tiny_backbone) -> None:
    det = CountingWinClip(tiny_backbone)
    det.own_calibration = True
    CountingWinClip.fits = 0
    result = build_product(det, SPEC, [rgb("good/00.png"), rgb("good/01.png")])
    assert CountingWinClip.fits == 1
    assert result.calibration["augmented_views"] == 8 and result.calibration["leave_one_out"] == 0


def test_progress_is_reported_and_ends_at_one(tiny_backbone) -> None:
    from inspectd.detectors.context import FitContext

    seen: list[tuple[float, str]] = []
    build_product(CountingWinClip(tiny_backbone), SPEC, [rgb("good/00.png"), rgb("good/01.png")],
                  ctx=FitContext(on_progress=lambda f, note: seen.append((f, note))))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] == 0.0
    assert any("leave-one-out" in note for _, note in seen)


def test_threshold_policy_is_validated() -> None:
    with pytest.raises(BuildError, match="quantile"):
        ThresholdPolicy(quantile=1.5)


def test_fingerprint_depends_on_detector_version_options_and_references(tiny_backbone, tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(rgb("good/00.png")).save(a)
    Image.fromarray(rgb("good/01.png")).save(b)
    det = create_detector("winclip", tiny_backbone)
    policy = ThresholdPolicy()
    base = build_fingerprint(det, SPEC, policy, [a])
    assert build_fingerprint(det, SPEC, policy, [a]) == base
    assert build_fingerprint(det, SPEC, policy, [b]) != base
    assert build_fingerprint(create_detector("winclip", tiny_backbone, {"language_weight": 0.3}), SPEC, policy,
                             [a]) != base
    assert build_fingerprint(det, SPEC, ThresholdPolicy(margin=0.1), [a]) != base

    class NewerWinClip(WinClip):
        name = "winclip"  # same name, maths changed
        version = WinClip.version + 1

    assert build_fingerprint(NewerWinClip(tiny_backbone), SPEC, policy, [a]) != base


def test_cache_round_trip_and_unreadable_files_are_moved_aside(tiny_backbone, tmp_path: Path) -> None:
    det = create_detector("winclip", tiny_backbone)
    cache = StateCache(tmp_path / "cache")
    result = build_product(det, SPEC, [rgb("good/00.png"), rgb("good/01.png")])
    result.fingerprint = "f" * 20
    cache.store(det, "nut", result)
    loaded = cache.load(det, "nut", result.fingerprint)
    assert loaded is not None and cache.hits == 1
    assert loaded.threshold == result.threshold and loaded.calibration == result.calibration
    path = cache.path("nut", result.fingerprint)
    path.write_bytes(b"\x00" * 64)  # damaged (disk trouble, a partial copy)
    assert cache.load(det, "nut", result.fingerprint) is None
    (moved,) = path.parent.glob(path.name + ".*.unreadable")  # NAME.<time>-<id>.unreadable
    assert not path.exists() and moved.read_bytes() == b"\x00" * 64  # kept for whoever wants it back
    assert "unreadable" in moved.with_name(moved.name + ".why").read_text()


def test_a_second_damaged_copy_is_quarantined_beside_the_first(tiny_backbone, tmp_path: Path) -> None:
    """The docstring's promise: moved aside, never deleted -- also not by the next damaged file of the same key."""
    det = create_detector("winclip", tiny_backbone)
    cache = StateCache(tmp_path / "cache")
    path = cache.path("nut", "e" * 20)
    for payload in (b"\x01" * 64, b"\x02" * 64):
        path.write_bytes(payload)
        assert cache.load(det, "nut", "e" * 20) is None
    moved = sorted(path.parent.glob(path.name + ".*.unreadable"))
    assert sorted(m.read_bytes() for m in moved) == [b"\x01" * 64, b"\x02" * 64]
    assert all(m.with_name(m.name + ".why").is_file() for m in moved)


def test_a_damaged_state_another_process_moved_aside_first_is_a_miss(tiny_backbone, tmp_path: Path) -> None:
    """Two daemons sharing state_cache_dir find one damaged file: B has seen it exist, A moves it aside, then B's
    load fails and B's quarantine finds nothing -- a cache miss (B rebuilds), not a rejected build."""
    det_a, det_b = create_detector("winclip", tiny_backbone), create_detector("winclip", tiny_backbone)
    cache_a, cache_b = StateCache(tmp_path / "shared"), StateCache(tmp_path / "shared")
    fingerprint = "0123456789abcdef0123"
    path = cache_a.path("nut", fingerprint)
    path.write_bytes(b"\x00" * 64)
    real = det_b.load_state

    def b_load_state(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        assert cache_a.load(det_a, "nut", fingerprint) is None  # daemon A quarantines it at this moment
        return real(*args, **kwargs)

    det_b.load_state = b_load_state
    assert cache_b.load(det_b, "nut", fingerprint) is None and cache_b.misses == 1
    (moved,) = path.parent.glob(path.name + ".*.unreadable")  # A's copy, kept
    assert moved.read_bytes() == b"\x00" * 64 and not path.exists()


def test_a_state_of_another_detector_version_is_refused_naming_both(tiny_backbone, tmp_path: Path) -> None:
    det = create_detector("winclip", tiny_backbone)
    state = det.fit(SPEC, [])
    det.save_state(state, tmp_path / "s.safetensors")

    class NewerWinClip(WinClip):
        name = "winclip"
        version = WinClip.version + 1

    with pytest.raises(ArtifactMismatch, match=rf"version {WinClip.version}.*version {WinClip.version + 1}"):
        NewerWinClip(tiny_backbone).load_state(tmp_path / "s.safetensors")
