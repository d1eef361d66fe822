"""Metrics vs scikit-learn and an independent slow PRO; binned streaming vs exact; edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from inspectd.detectors.evaluation.metrics import (
    ALL_METRICS,
    CategoryEvaluator,
    PixelMetricAccumulator,
    image_metrics,
    pixel_metrics_exact,
)


def sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


def slow_pro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Independent PRO: loop over every distinct threshold and every connected component (8-connectivity)."""
    comps = []
    for i, g in enumerate(masks):
        labelled, n = ndimage.label(g, structure=np.ones((3, 3)))
        comps.extend((i, labelled == k) for k in range(1, n + 1))
    normal_total = sum(int((~g).sum()) for g in masks)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        fp = sum(int(((m >= t) & ~g).sum()) for m, g in zip(maps, masks, strict=True))
        overlaps = [float((maps[i][c] >= t).mean()) for i, c in comps]
        xs.append(fp / normal_total)
        ys.append(float(np.mean(overlaps)))
    # integrate the step-free piecewise-linear curve up to fpr_limit, interpolating at the cut
    area = 0.0
    for j in range(1, len(xs)):
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def synthetic_maps(rng: np.random.Generator, n: int, size: int, levels: int | None = None):
    """Smooth noisy maps with blob defects of several components; roughly a real detector's output."""
    maps, masks = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        g = np.zeros((size, size), dtype=bool)
        if i % 3:  # two of three images defective, 1-3 regions each
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(2, max(3, size // 8))
                g |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2) * 4.0
        signal = ndimage.gaussian_filter(g.astype(float), 1.5) * rng.uniform(0.5, 1.5)
        m = 1 / (1 + np.exp(-(noise + 2.5 * signal - 1.0)))
        if levels:
            m = np.round(m * levels) / levels
        maps.append(m.astype(np.float32))
        masks.append(g)
    return maps, masks


# ------------------------------------------------------------------------------------------------ image level


@pytest.mark.parametrize("tied", [False, True])
def test_image_metrics_match_sklearn(tied: bool) -> None:
    rng = np.random.default_rng(1 + tied)
    for _ in range(20):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.normal(size=n) + rng.uniform(0, 2) * y
        if tied:
            s = np.round(s, 0)  # heavy ties, also across classes
        m = image_metrics(y, s)
        assert m.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert m.f1_max == pytest.approx(sk_f1_max(y, s), abs=1e-12)
        assert m.n_images == n and m.n_anomalous == int(y.sum())


def test_image_metrics_known_values_and_threshold() -> None:
    m = image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m.auroc == pytest.approx(0.75)
    assert m.ap == pytest.approx(average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]))
    # best F1 at threshold 0.35: tp=2, fp=1 -> P=2/3, R=1 -> F1=0.8
    assert m.f1_max == pytest.approx(0.8) and m.f1_threshold == pytest.approx(0.35)
    perfect = image_metrics([0, 1, 1], [0.0, 0.9, 0.5])
    assert (perfect.auroc, perfect.ap, perfect.f1_max) == (1.0, 1.0, 1.0)
    all_tied = image_metrics([0, 1, 0, 1], [0.5] * 4)
    assert all_tied.auroc == pytest.approx(0.5) and all_tied.ap == pytest.approx(0.5)


def test_image_metrics_undefined_cases_are_nan_with_a_note() -> None:
    normal_only = image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(normal_only.auroc) and math.isnan(normal_only.ap) and math.isnan(normal_only.f1_max)
    assert any("no anomalous" in n for n in normal_only.notes)
    anomalous_only = image_metrics([1, 1], [0.1, 0.2])
    assert math.isnan(anomalous_only.auroc) and anomalous_only.ap == 1.0
    assert any("no normal" in n for n in anomalous_only.notes)
    with pytest.raises(ValueError):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        image_metrics([0, 1], [0.1, float("nan")])


# ------------------------------------------------------------------------------------------------ pixel level


def test_exact_pixel_metrics_match_sklearn_and_slow_pro_with_ties() -> None:
    rng = np.random.default_rng(7)
    maps, masks = synthetic_maps(rng, n=6, size=40, levels=60)  # heavy ties: 61 score levels
    assert sum(ndimage.label(g, structure=np.ones((3, 3)))[1] for g in masks) >= 4
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    y = np.concatenate([g.ravel() for g in masks])
    ex = pixel_metrics_exact(maps, masks)
    assert ex.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ex.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert ex.f1_max == pytest.approx(sk_f1_max(y, s), abs=1e-12)
    assert ex.pro == pytest.approx(slow_pro(maps, masks), abs=1e-9)
    # streaming on the same tied data: the levels fall in distinct bins, so the values are the same
    acc = PixelMetricAccumulator(bins=1 << 12)
    for m, g in zip(maps, masks, strict=True):
        acc.update(m, g)
    b = acc.compute()
    for name in ("auroc", "ap", "f1_max", "pro"):
        assert getattr(b, name) == pytest.approx(getattr(ex, name), abs=1e-9), name


def test_pro_regions_are_weighted_equally_and_fpr_counts_normal_pixels_of_all_images() -> None:
    # one tiny region (1 px) and one big region (100 px), both above the normal pixels
    g = np.zeros((20, 20), dtype=bool)
    g[0, 0] = True
    g[10:20, 10:20] = True
    m = np.where(g, 0.7, 0.5).astype(np.float32)
    m[0, 0] = 1.0
    alone = pixel_metrics_exact([m], [g])
    assert alone.pro == pytest.approx(1.0)  # both regions fully covered before any false positive
    # an all-normal image scoring 0.9 everywhere: its 400 pixels are false positives above the big region,
    # so the curve is (0, 0) -> (0, 0.5) [t=1, tiny region only] -> (400/699, 0.5) -> ...: area = 0.5, not a
    # pixel-weighted 1/101
    normal = np.full((20, 20), 0.9, dtype=np.float32)
    both = pixel_metrics_exact([m, normal], [g, np.zeros_like(g)])
    assert both.pro == pytest.approx(0.5)
    assert both.pro == pytest.approx(slow_pro([m, normal], [g, np.zeros_like(g)]))
    # 4- vs 8-connectivity: a diagonal pair is one region with 8, two with 4
    diag = np.zeros((5, 5), dtype=bool)
    diag[1, 1] = diag[2, 2] = True
    assert pixel_metrics_exact([np.zeros((5, 5))], [diag]).n_regions == 1
    assert pixel_metrics_exact([np.zeros((5, 5))], [diag], connectivity=1).n_regions == 2


def test_binned_matches_exact_within_a_tenth_of_a_point_on_realistic_maps() -> None:
    rng = np.random.default_rng(3)
    maps, masks = synthetic_maps(rng, n=24, size=128)
    ex = pixel_metrics_exact(maps, masks)
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    y = np.concatenate([g.ravel() for g in masks])
    assert ex.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert ex.ap == pytest.approx(average_precision_score(y, s), abs=1e-10)
    acc = PixelMetricAccumulator()  # default 2^18 bins over [0, 1]
    for m, g in zip(maps, masks, strict=True):
        acc.update(m, g)
    b = acc.compute()
    assert 0.6 < ex.auroc < 0.999 and 0.1 < ex.pro < 0.99  # not a degenerate case
    assert abs(b.auroc - roc_auc_score(y, s)) < 1e-3
    assert abs(b.ap - average_precision_score(y, s)) < 1e-3
    assert abs(b.f1_max - sk_f1_max(y, s)) < 1e-3
    assert abs(b.pro - ex.pro) < 1e-3
    assert b.n_pixels == s.size and b.n_anomalous == int(y.sum()) and b.n_regions == ex.n_regions
    # coarse bins are allowed to be off, which shows the check above can fail
    coarse = PixelMetricAccumulator(bins=16)
    for m, g in zip(maps, masks, strict=True):
        coarse.update(m, g)
    assert abs(coarse.compute().ap - ex.ap) > 1e-3


def test_binned_range_grows_exactly_for_scores_outside_the_initial_range() -> None:
    rng = np.random.default_rng(5)
    maps, masks = synthetic_maps(rng, n=8, size=64)
    maps = [m * 6.0 - 2.0 for m in maps]  # scores in about [-2, 4] (e.g. a sum of stage maps)
    ex = pixel_metrics_exact(maps, masks)
    acc = PixelMetricAccumulator(bins=1 << 16)
    for m, g in zip(maps, masks, strict=True):
        acc.update(m, g)
    b = acc.compute()
    assert acc.growths >= 3 and any("range grew" in n for n in b.notes)
    lo, hi = acc.covered_range
    assert lo <= min(m.min() for m in maps) and hi > max(m.max() for m in maps)
    for name in ("auroc", "ap", "f1_max", "pro"):
        assert abs(getattr(b, name) - getattr(ex, name)) < 1e-3, name
    # auto range from the first map, then growth
    auto = PixelMetricAccumulator(bins=1 << 16, value_range=None)
    for m, g in zip(maps, masks, strict=True):
        auto.update(m, g)
    assert abs(auto.compute().auroc - ex.auroc) < 1e-3


def test_pixel_edge_cases() -> None:
    rng = np.random.default_rng(11)
    maps, masks = synthetic_maps(rng, n=3, size=32)
    acc = PixelMetricAccumulator()
    for m in maps:  # all-normal category
        acc.update(m, np.zeros(m.shape, dtype=bool))
    r = acc.compute()
    assert all(math.isnan(v) for v in (r.auroc, r.ap, r.f1_max, r.pro))
    assert any("no anomalous" in n for n in r.notes) and r.n_regions == 0
    full = PixelMetricAccumulator()
    full.update(maps[0], np.ones(maps[0].shape, dtype=bool))
    fr = full.compute()
    assert math.isnan(fr.auroc) and math.isnan(fr.pro) and fr.ap == 1.0
    empty = PixelMetricAccumulator().compute()
    assert math.isnan(empty.auroc) and empty.n_pixels == 0
    # images without anomalous pixels mixed with defective ones are fine (they add normal pixels only)
    mixed = PixelMetricAccumulator()
    mixed.update(maps[0], np.zeros((32, 32), dtype=bool))
    g = np.zeros((32, 32), dtype=bool)
    g[5:9, 5:9] = True
    mixed.update(np.where(g, 0.9, 0.1), g)
    assert mixed.compute().auroc > 0.9 and mixed.compute().n_regions == 1
    with pytest.raises(ValueError):
        mixed.update(np.zeros((4, 4)), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError):
        mixed.update(np.full((4, 4), np.nan), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError):
        mixed.update(np.zeros((4, 4)), np.full((4, 4), 255, dtype=np.uint8))


def test_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(2)
    maps, masks = synthetic_maps(rng, n=6, size=48)
    one, a, b = PixelMetricAccumulator(), PixelMetricAccumulator(), PixelMetricAccumulator()
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        one.update(m, g)
        (a if i % 2 else b).update(m, g)
    a.merge(b)
    assert a.compute() == one.compute()


def test_category_evaluator_with_and_without_masks() -> None:
    rng = np.random.default_rng(4)
    maps, masks = synthetic_maps(rng, n=6, size=32)
    ev = CategoryEvaluator("grid", bins=1 << 12)
    for m, g in zip(maps, masks, strict=True):
        label = int(g.any())
        ev.update(float(m.max()), label, m, g if label else None)
    values, notes = ev.compute()
    assert set(values) == set(ALL_METRICS)
    assert not math.isnan(values["pixel_pro"]) and not notes
    no_masks = CategoryEvaluator("bottle", has_masks=False)
    for m, g in zip(maps, masks, strict=True):
        no_masks.update(float(m.max()), int(g.any()), m)
    values, notes = no_masks.compute()
    assert not math.isnan(values["image_auroc"]) and math.isnan(values["pixel_auroc"])
    assert notes == []  # the dataset reader's note says it once ("N of M anomalous images have no mask")
    with pytest.raises(ValueError):
        ev.update(0.5, 1, maps[0], None)
