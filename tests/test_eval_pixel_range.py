"""Streaming pixel metrics are as accurate wherever the scores lie (not only for scores filling [0, 1]).

The accumulator used to quantise over [0, 1] and double that range for scores outside it, so scores in [40, 41],
[0, 0.001] or [-5000, -4999] ended up in a few hundred or a few dozen of its 2^18 bins and pixel AP / F1-max /
PRO came out off by up to 2 points against the exact values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from inspectd.detectors.evaluation.metrics import PixelMetricAccumulator, pixel_metrics_exact

# the default accumulator (2^18 bins) is within a few 1e-6 of sklearn for the [0, 1] maps below; a tolerance
# 5x that error, for every placement of the same maps
TOLERANCE = 2e-5


def maps_and_masks(seed: int, n: int = 12, size: int = 96) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Smooth noisy sigmoid maps in (0, 1) with blob defects; about a real detector's output."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps, masks = [], []
    for i in range(n):
        g = np.zeros((size, size), dtype=bool)
        if i % 3:
            for _ in range(int(rng.integers(1, 4))):
                cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(2, size // 8)
                g |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2) * 4.0
        signal = ndimage.gaussian_filter(g.astype(float), 1.5) * rng.uniform(0.5, 1.5)
        maps.append(1 / (1 + np.exp(-(noise + 2.5 * signal - 1.0))))
        masks.append(g)
    return maps, masks


def sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


def errors(maps: list[np.ndarray], masks: list[np.ndarray], acc: PixelMetricAccumulator) -> dict[str, float]:
    """|streamed - exact| per metric (AUROC, AP, F1-max from sklearn on the raw arrays, PRO unbinned)."""
    for m, g in zip(maps, masks, strict=True):
        acc.update(m, g)
    got = acc.compute()
    s = np.concatenate([m.ravel() for m in maps])
    y = np.concatenate([g.ravel() for g in masks])
    exact = {
        "auroc": roc_auc_score(y, s),
        "ap": average_precision_score(y, s),
        "f1_max": sk_f1_max(y, s),
        "pro": pixel_metrics_exact(maps, masks).pro,
    }
    return {name: abs(getattr(got, name) - value) for name, value in exact.items()}


PLACEMENTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "[0, 1]": lambda m: m,
    "[40, 41]": lambda m: m + 40.0,
    "[0, 0.001]": lambda m: m * 1e-3,
    "[-5000, -4999]": lambda m: m - 5000.0,
    "[0.5, 0.5 + 1e-6]": lambda m: 0.5 + m * 1e-6,
    "[1e6, 1e6 + 30]": lambda m: 1e6 + m * 30.0,
    "[-3, 7]": lambda m: m * 10.0 - 3.0,
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_pixel_metrics_are_as_accurate_wherever_the_scores_lie(placement: str) -> None:
    maps, masks = maps_and_masks(seed=3)
    moved = [PLACEMENTS[placement](m) for m in maps]
    err = errors(moved, masks, PixelMetricAccumulator())  # the runner's default: 2^18 bins, value_range [0, 1]
    assert max(err.values()) < TOLERANCE, {k: f"{v:.2e}" for k, v in err.items()}


def test_scores_in_value_range_keep_its_bins_exactly() -> None:
    """The old guarantee for [0, 1] maps is unchanged: maps filling most of [0, 1] get [0, 1]'s own bins."""
    maps, masks = maps_and_masks(seed=5, n=6, size=48)
    acc = PixelMetricAccumulator(bins=1 << 12)
    for m, g in zip(maps, masks, strict=True):
        acc.update(m, g)
    width = 1.0 / ((1 << 12) - 1)
    assert acc.bin_width == width and acc.covered_range == (0.0, width * (1 << 12)) and acc.growths == 0
    assert not acc.compute().notes


def test_narrow_first_maps_refine_the_bins_and_never_end_coarser_than_value_range() -> None:
    """A first map in a small part of [0, 1] gets finer bins; later maps filling [0, 1] coarsen them exactly, but
    never beyond [0, 1]'s own, and the result is as accurate as with [0, 1]'s bins from the start."""
    maps, masks = maps_and_masks(seed=7, n=9, size=64)
    narrow = [0.45 + 0.01 * maps[0], *maps[1:]]  # the first map spans about 0.01
    acc = PixelMetricAccumulator()
    acc.update(narrow[0], masks[0])
    assert acc.bin_width < 1.0 / 64 / ((1 << 18) - 1)  # refined by 2^6 or more
    err = errors(narrow[1:], masks[1:], acc)
    s = np.concatenate([m.ravel() for m in narrow])
    y = np.concatenate([g.ravel() for g in masks])
    assert acc.bin_width <= 1.0 / ((1 << 18) - 1)
    got = acc.compute()
    assert abs(got.ap - average_precision_score(y, s)) < TOLERANCE
    assert abs(got.auroc - roc_auc_score(y, s)) < TOLERANCE and max(err.values()) < 1.0  # (err: maps 1.. only)
    assert not got.notes  # no "range grew": the bins did not get coarser than value_range's


def test_scores_span_at_least_half_the_bins_as_the_range_drifts() -> None:
    """Maps that move and widen image by image (both directions, far from [0, 1]) stay in >= bins/2 - 1 bins."""
    rng = np.random.default_rng(9)
    bins = 1 << 10
    acc = PixelMetricAccumulator(bins=bins)
    maps, masks = [], []
    centre, spread = -700.0, 0.01
    for i in range(14):
        centre += rng.choice([-1.0, 1.0]) * spread * rng.uniform(1, 4)
        spread *= rng.uniform(1.0, 1.8)
        m = centre + spread * rng.standard_normal((24, 24))
        g = rng.random((24, 24)) < 0.2
        acc.update(m, g)
        maps.append(m)
        masks.append(g)
        low, high = min(x.min() for x in maps), max(x.max() for x in maps)
        covered = acc.covered_range
        assert covered is not None and covered[0] <= low and high < covered[1]
        assert (high - low) / acc.bin_width >= bins / 2 - 2, i
    exact = pixel_metrics_exact(maps, masks)
    got = acc.compute()
    for name in ("auroc", "ap", "f1_max", "pro"):
        assert abs(getattr(got, name) - getattr(exact, name)) < 5e-3, name  # 1024 bins only


def test_constant_maps_are_counted_exactly_until_the_scores_differ() -> None:
    """An all-equal map (e.g. a detector's zero map for a clean image) first fixes no bins: its count is exact,
    and bins are placed once a map with two different scores arrives."""
    maps, masks = maps_and_masks(seed=11, n=6, size=48)
    flat = np.full((48, 48), -4999.5)
    only_flat = PixelMetricAccumulator()
    g = np.zeros((48, 48), dtype=bool)
    g[10:20, 10:20] = True
    only_flat.update(flat, g)
    only_flat.update(flat, np.zeros_like(g))
    result, exact = only_flat.compute(), pixel_metrics_exact([flat, flat], [g, np.zeros_like(g)])
    assert only_flat.covered_range is None and result.bin_width == 0.0
    for name in ("auroc", "ap", "f1_max", "pro"):
        assert getattr(result, name) == pytest.approx(getattr(exact, name), abs=1e-12), name
    moved = [flat, *[m - 5000.0 for m in maps]]
    err = errors(moved, [np.zeros_like(g), *masks], PixelMetricAccumulator())
    assert max(err.values()) < TOLERANCE


def test_merge_of_accumulators_refined_differently_is_exact() -> None:
    """Workers whose first maps differ have bins of other widths on the same lattice: the merge is exact."""
    maps, masks = maps_and_masks(seed=13, n=8, size=48)
    maps = [1e-3 * m for m in maps]
    maps[0] = 4e-4 + 1e-5 * maps[0]  # a narrow first map: finer bins for the worker that gets it
    one, a, b = PixelMetricAccumulator(), PixelMetricAccumulator(), PixelMetricAccumulator()
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        one.update(m, g)
        (a if i == 0 else b).update(m, g)
    assert a.bin_width < b.bin_width / 16
    a.merge(b)
    assert a.bin_width == one.bin_width == b.bin_width
    merged, single = a.compute(), one.compute()
    for name in ("auroc", "ap", "f1_max", "pro", "f1_threshold"):
        assert getattr(merged, name) == pytest.approx(getattr(single, name), abs=1e-12), name
    assert (merged.n_pixels, merged.n_anomalous, merged.n_regions) == (
        single.n_pixels,
        single.n_anomalous,
        single.n_regions,
    )
    other = PixelMetricAccumulator(value_range=None)
    other.update(maps[0], masks[0])
    with pytest.raises(ValueError, match="lattice"):
        a.merge(other)
    empty = PixelMetricAccumulator()
    empty.merge(one)
    assert empty.compute() == one.compute()
    assert math.isnan(PixelMetricAccumulator().compute().auroc)


def test_scores_too_far_apart_for_float64_bins_are_a_clear_error() -> None:
    """A lattice fitted to [1e-300, 2e-300] cannot index a map in [0, 1e6]: a ValueError saying so (it was an
    OverflowError from deep inside the re-binning)."""
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    acc = PixelMetricAccumulator(value_range=None)
    acc.update(np.where(mask, 2e-300, 1e-300), mask)
    with pytest.raises(ValueError, match="too far from the ones before"):
        acc.update(np.where(mask, 1e6, 0.0), mask)
