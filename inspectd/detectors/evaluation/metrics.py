"""Anomaly-detection metrics: image AUROC/AP/F1-max (exact) and pixel AUROC/AP/F1-max/PRO (streaming,
binned histograms so a whole category never sits in RAM). Values are fractions in [0, 1]; undefined → NaN + a note.

Definitions (match scikit-learn and the MVTec AD reference evaluation):
- AUROC: area under the ROC curve (`roc_auc_score`); AP: `average_precision_score` (sum over thresholds of
  (R_n - R_{n-1}) P_n, no interpolation); F1-max: max over thresholds of 2PR/(P+R) (`precision_recall_curve`).
- PRO: area under the per-region-overlap curve for FPR in [0, 0.3], divided by 0.3 (linear interpolation at 0.3).
  Regions are connected components of each ground-truth mask (8-connectivity by default, as the MVTec AD
  evaluation code); the overlap at a threshold is averaged over all regions of all images, and the FPR is taken
  over the normal pixels of all images (including the normal pixels of defective images).

Streaming pixel metrics quantise scores into `bins` equal-width half-open bins over a range that starts at
`value_range` (default [0, 1], the detectors' output) and doubles exactly (adjacent bins merged) whenever a value
falls outside it. Metrics are then exact for the quantised scores; tests pin them to within 0.001 of sklearn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

PRO_FPR_LIMIT = 0.3
DEFAULT_BINS = 1 << 18

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_pro")
ALL_METRICS = IMAGE_METRICS + PIXEL_METRICS


@dataclass(frozen=True)
class ImageMetrics:
    """Image-level metrics of one category; NaN where undefined (see ``notes``)."""

    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float
    n_images: int
    n_anomalous: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level metrics of one category; NaN where undefined (see ``notes``)."""

    auroc: float
    ap: float
    f1_max: float
    pro: float
    f1_threshold: float
    n_pixels: int
    n_anomalous: int
    n_regions: int
    bin_width: float = 0.0  # 0 for exact computation
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Curves:
    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float
    notes: tuple[str, ...]


def _curves_from_counts(thresholds: np.ndarray, pos: np.ndarray, neg: np.ndarray, what: str) -> _Curves:
    """AUROC, AP and F1-max from per-threshold counts ordered by decreasing threshold.

    ``pos[i]``/``neg[i]`` count positives/negatives whose score quantises to ``thresholds[i]``; tied scores share
    one entry, so ties move together exactly as in scikit-learn.
    """
    keep = (pos + neg) > 0
    thresholds, pos, neg = thresholds[keep], pos[keep].astype(np.float64), neg[keep].astype(np.float64)
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    n_pos = tp[-1] if tp.size else 0.0
    n_neg = fp[-1] if fp.size else 0.0
    notes: list[str] = []
    if n_pos == 0:
        notes.append(f"{what} AUROC/AP/F1-max undefined (NaN): no anomalous samples")
        return _Curves(math.nan, math.nan, math.nan, math.nan, tuple(notes))
    if n_neg == 0:
        notes.append(f"{what} AUROC undefined (NaN): no normal samples")
        auroc = math.nan
    else:
        tpr = np.concatenate(([0.0], tp / n_pos))
        fpr = np.concatenate(([0.0], fp / n_neg))
        auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))
    precision = tp / (tp + fp)
    recall = tp / n_pos
    ap = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return _Curves(auroc, ap, float(f1[best]), float(thresholds[best]), tuple(notes))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max] / x_max; x ascending from 0, y interpolated at the cut."""
    ins = int(np.searchsorted(x, x_max, side="right"))  # x[:ins] <= x_max < x[ins]
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) * 0.5))
    if ins < x.size and xs[-1] < x_max:
        y_cut = ys[-1] + (y[ins] - ys[-1]) * (x_max - xs[-1]) / (x[ins] - xs[-1])
        area += 0.5 * (ys[-1] + y_cut) * (x_max - xs[-1])
    return float(area / x_max)


def _pro_from_counts(neg: np.ndarray, region_weight: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    """PRO area from per-threshold (decreasing) normal-pixel counts and summed 1/|region| weights."""
    n_neg = float(neg.sum())
    if n_regions == 0 or n_neg == 0:
        return math.nan
    fpr = np.concatenate(([0.0], np.cumsum(neg) / n_neg))
    pro = np.concatenate(([0.0], np.cumsum(region_weight) / n_regions))
    return _area_up_to(fpr, np.minimum(pro, 1.0), fpr_limit)


def _check_binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and not np.isin(labels, (0, 1, True, False)).all():
        raise ValueError("labels must be 0/1 (or bool)")
    return labels.astype(bool)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinite values")


# ----------------------------------------------------------------------------------------------- image level


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> ImageMetrics:
    """Exact image AUROC, AP and F1-max of one category (labels 1 = anomalous; higher score = more anomalous)."""
    y = _check_binary_labels(np.asarray(labels)).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    _check_finite(s, "image scores")
    if s.size == 0:
        return ImageMetrics(math.nan, math.nan, math.nan, math.nan, 0, 0, ("no images",))
    values, inverse = np.unique(s, return_inverse=True)  # ascending
    pos = np.bincount(inverse, weights=y, minlength=values.size)[::-1]
    neg = np.bincount(inverse, weights=~y, minlength=values.size)[::-1]
    c = _curves_from_counts(values[::-1], pos, neg, "image")
    return ImageMetrics(c.auroc, c.ap, c.f1_max, c.f1_threshold, int(s.size), int(y.sum()), c.notes)


class ImageMetricAccumulator:
    """Collects (score, label) pairs image by image; `compute` gives exact `ImageMetrics`."""

    def __init__(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []

    def update(self, score: float, label: int) -> None:
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        self._scores.append(float(score))
        self._labels.append(int(label))

    def __len__(self) -> int:
        return len(self._scores)

    def compute(self) -> ImageMetrics:
        return image_metrics(np.asarray(self._labels, dtype=np.int64), np.asarray(self._scores))


# ----------------------------------------------------------------------------------------------- pixel level


def _region_weights(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel (in ``mask[mask]`` order) the weight 1/|its connected region|, and the region count."""
    labelled, n_regions = ndimage.label(mask, structure=structure)
    if n_regions == 0:
        return np.zeros(0, dtype=np.float64), 0
    sizes = np.bincount(labelled.ravel())
    return 1.0 / sizes[labelled[mask]], int(n_regions)


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError("connectivity must be 1 (4-neighbours) or 2 (8-neighbours)")
    return ndimage.generate_binary_structure(2, connectivity)


def _check_pair(anomaly_map: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(anomaly_map)
    g = np.asarray(mask)
    if m.ndim != 2 or m.shape != g.shape:
        raise ValueError(f"anomaly map {m.shape} and mask {g.shape} must be the same H x W")
    if g.dtype != bool:
        if not np.isin(g, (0, 1)).all():
            raise ValueError("mask must be bool or 0/1; binarise it first (e.g. mask > 0)")
        g = g.astype(bool)
    _check_finite(m, "anomaly maps")
    return m, g


class PixelMetricAccumulator:
    """Streaming pixel AUROC / AP / F1-max / PRO over a category, image by image, in O(bins) memory.

    ``update(map, mask)`` takes one H×W score map (any float dtype/range) and its bool mask of the same shape
    (resize one of them to the other first); ``compute()`` returns `PixelMetrics`. Three histograms of ``bins``
    entries are kept: anomalous-pixel counts, normal-pixel counts, and per-region overlap weights (each anomalous
    pixel adds 1/|its region|, so the cumulative sum above a threshold is the summed per-region overlap).
    """

    def __init__(
        self,
        bins: int = DEFAULT_BINS,
        value_range: tuple[float, float] | None = (0.0, 1.0),
        connectivity: int = 2,
        fpr_limit: float = PRO_FPR_LIMIT,
    ) -> None:
        if bins < 16 or bins % 2:
            raise ValueError("bins must be an even number >= 16")
        if value_range is not None and not value_range[1] > value_range[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError("fpr_limit must be in (0, 1]")
        self.bins = bins
        self.fpr_limit = fpr_limit
        self._structure = _structure(connectivity)
        self._lo: float | None = None
        self._width = 0.0
        if value_range is not None:
            self._set_range(*value_range)
        self._pos = np.zeros(bins, dtype=np.int64)
        self._neg = np.zeros(bins, dtype=np.int64)
        self._region = np.zeros(bins, dtype=np.float64)
        self.n_regions = 0
        self.n_images = 0
        self.growths = 0

    def _set_range(self, low: float, high: float) -> None:
        # (bins - 1) steps span [low, high], so `high` itself lies inside the last half-open bin.
        self._lo = float(low)
        self._width = (float(high) - float(low)) / (self.bins - 1)

    @property
    def bin_width(self) -> float:
        return self._width

    @property
    def covered_range(self) -> tuple[float, float] | None:
        """The half-open score interval the histograms cover now."""
        return None if self._lo is None else (self._lo, self._lo + self._width * self.bins)

    def _grow(self, down: bool) -> None:
        """Double the covered range (down or up), merging adjacent bin pairs: exact, halves the resolution."""
        half = self.bins // 2
        for name in ("_pos", "_neg", "_region"):
            old = getattr(self, name)
            new = np.zeros_like(old)
            merged = old[0::2] + old[1::2]
            if down:
                new[half:] = merged
            else:
                new[:half] = merged
            setattr(self, name, new)
        if down:
            self._lo -= self._width * self.bins
        self._width *= 2.0
        self.growths += 1

    def _indices(self, values: np.ndarray) -> np.ndarray:
        if self._lo is None:
            low, high = float(values.min()), float(values.max())
            self._set_range(low, high if high > low else low + 1.0)
        while True:
            idx = np.floor((values - self._lo) / self._width)
            low_i, high_i = idx.min(), idx.max()
            if low_i >= 0 and high_i < self.bins:
                return idx.astype(np.int64)
            self._grow(down=bool(low_i < 0))

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        m, g = _check_pair(anomaly_map, mask)
        self.n_images += 1
        if m.size == 0:
            return
        idx = self._indices(m.astype(np.float64, copy=False).ravel())
        flat = g.ravel()
        self._pos += np.bincount(idx[flat], minlength=self.bins)
        self._neg += np.bincount(idx[~flat], minlength=self.bins)
        if flat.any():
            weights, n_regions = _region_weights(g, self._structure)
            self._region += np.bincount(idx[flat], weights=weights, minlength=self.bins)
            self.n_regions += n_regions

    def merge(self, other: PixelMetricAccumulator) -> None:
        """Add another accumulator's counts (same bins/range/connectivity), e.g. from a parallel worker."""
        if other.bins != self.bins or other._lo != self._lo or other._width != self._width:
            raise ValueError("can only merge accumulators with identical bins and covered range")
        self._pos += other._pos
        self._neg += other._neg
        self._region += other._region
        self.n_regions += other.n_regions
        self.n_images += other.n_images

    def compute(self) -> PixelMetrics:
        n_pos, n_neg = int(self._pos.sum()), int(self._neg.sum())
        if self._lo is None:
            return PixelMetrics(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, 0.0, ("no pixels",))
        thresholds = (self._lo + self._width * np.arange(self.bins))[::-1]  # lower bin edges, decreasing
        pos, neg, region = self._pos[::-1], self._neg[::-1], self._region[::-1]
        c = _curves_from_counts(thresholds, pos, neg, "pixel")
        pro = _pro_from_counts(neg, region, self.n_regions, self.fpr_limit)
        notes = list(c.notes)
        if math.isnan(pro) and n_pos:
            notes.append("PRO undefined (NaN): no normal pixels")
        elif math.isnan(pro):
            notes.append("PRO undefined (NaN): no anomalous regions")
        if self.growths:
            lo, hi = self.covered_range or (0.0, 0.0)
            notes.append(f"score range grew {self.growths}x to [{lo:.6g}, {hi:.6g}); bin width {self._width:.3g}")
        return PixelMetrics(
            c.auroc, c.ap, c.f1_max, pro, c.f1_threshold, n_pos + n_neg, n_pos, self.n_regions, self._width,
            tuple(notes),
        )


def pixel_metrics_exact(
    maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], connectivity: int = 2, fpr_limit: float = PRO_FPR_LIMIT
) -> PixelMetrics:
    """Exact (unbinned) pixel metrics; holds every pixel in RAM, so only for small sets and for checking."""
    structure = _structure(connectivity)
    values, labels, weights = [], [], []
    n_regions = 0
    for anomaly_map, mask in zip(maps, masks, strict=True):
        m, g = _check_pair(anomaly_map, mask)
        values.append(m.astype(np.float64).ravel())
        labels.append(g.ravel())
        w = np.zeros(g.size, dtype=np.float64)
        if g.any():
            region_w, n = _region_weights(g, structure)
            w[g.ravel()] = region_w
            n_regions += n
        weights.append(w)
    if not values:
        return PixelMetrics(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, 0.0, ("no pixels",))
    s, y, w = np.concatenate(values), np.concatenate(labels), np.concatenate(weights)
    uniq, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=uniq.size)[::-1]
    neg = np.bincount(inverse, weights=~y, minlength=uniq.size)[::-1]
    region = np.bincount(inverse, weights=w, minlength=uniq.size)[::-1]
    c = _curves_from_counts(uniq[::-1], pos, neg, "pixel")
    pro = _pro_from_counts(neg, region, n_regions, fpr_limit)
    notes = list(c.notes)
    if math.isnan(pro):
        notes.append("PRO undefined (NaN): " + ("no normal pixels" if y.any() else "no anomalous regions"))
    return PixelMetrics(c.auroc, c.ap, c.f1_max, pro, c.f1_threshold, int(s.size), int(y.sum()), n_regions, 0.0,
                        tuple(notes))


# ----------------------------------------------------------------------------------------------- per category


@dataclass
class CategoryEvaluator:
    """Everything a runner feeds per test image of one category; `compute` gives the flat metric dict.

    With ``has_masks=False`` (masks missing for the category) only image metrics are computed and a note says so;
    pixel metrics are then NaN.
    """

    category: str
    has_masks: bool = True
    bins: int = DEFAULT_BINS
    value_range: tuple[float, float] | None = (0.0, 1.0)
    image: ImageMetricAccumulator = field(default_factory=ImageMetricAccumulator)
    pixel: PixelMetricAccumulator | None = None

    def __post_init__(self) -> None:
        if self.has_masks and self.pixel is None:
            self.pixel = PixelMetricAccumulator(bins=self.bins, value_range=self.value_range)

    def update(self, score: float, label: int, anomaly_map: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> None:
        """Add one test image. A normal image may pass ``mask=None`` (all-normal mask of the map's shape)."""
        self.image.update(score, label)
        if self.pixel is None or anomaly_map is None:
            return
        if mask is None:
            if label:
                raise ValueError(f"{self.category}: anomalous image without a mask in a category with masks")
            mask = np.zeros(np.shape(anomaly_map), dtype=bool)
        self.pixel.update(anomaly_map, mask)

    def compute(self) -> tuple[dict[str, float], list[str]]:
        """({metric name: value in [0,1] or NaN}, notes) with names from `ALL_METRICS`."""
        im = self.image.compute()
        out = {"image_auroc": im.auroc, "image_ap": im.ap, "image_f1_max": im.f1_max}
        notes = list(im.notes)
        if self.pixel is None:  # the dataset reader's note says why (e.g. "63 of 63 ... have no mask")
            out.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        elif self.pixel.n_images == 0:
            notes.append("no anomaly maps given: image metrics only")
            out.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        else:
            px = self.pixel.compute()
            out.update(pixel_auroc=px.auroc, pixel_ap=px.ap, pixel_f1_max=px.f1_max, pixel_pro=px.pro)
            notes.extend(px.notes)
        return out, [f"{self.category}: {n}" for n in notes]
