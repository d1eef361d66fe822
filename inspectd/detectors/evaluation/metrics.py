"""Anomaly-detection metrics: image AUROC/AP/F1-max (exact) and pixel AUROC/AP/F1-max/PRO (streaming,
binned histograms so a whole category never sits in RAM). Values are fractions in [0, 1]; undefined → NaN + a note.

Definitions (match scikit-learn and the MVTec AD reference evaluation):
- AUROC: area under the ROC curve (`roc_auc_score`); AP: `average_precision_score` (sum over thresholds of
  (R_n - R_{n-1}) P_n, no interpolation); F1-max: max over thresholds of 2PR/(P+R) (`precision_recall_curve`).
- PRO: area under the per-region-overlap curve for FPR in [0, 0.3], divided by 0.3 (linear interpolation at 0.3).
  Regions are connected components of each ground-truth mask (8-connectivity by default, as the MVTec AD
  evaluation code); the overlap at a threshold is averaged over all regions of all images, and the FPR is taken
  over the normal pixels of all images (including the normal pixels of defective images).

Streaming pixel metrics quantise scores into `bins` equal-width half-open bins placed where the scores are, so
their accuracy does not depend on the scores' location or scale. The bins lie on `value_range`'s lattice (default
[0, 1], the detectors' output: its own bins, their power-of-two refinements and coarsenings; a lattice fitted to
the first map's scores when there is no `value_range` or the scores lie too far from it for float64 bin indices).
The first map with two different scores picks the finest level that holds them (`value_range` itself when they
fill more than half of it, as before); a later score outside the bins re-places them at the finest level that
holds every score so far, centred on them, moving the counts exactly (a shift by whole bins, adjacent bins
merged). So the scores seen span at least bins/2 - 1 bins wherever they lie (as far as float64 resolves them),
and scores inside `value_range` never get coarser bins than its own. While every score seen is one value, its
counts are kept exactly. Metrics are then exact for the quantised scores; tests pin them to within 0.001 of
sklearn for [0, 1] maps, and to within 2e-5 with the default 2^18 bins wherever the same maps are moved or scaled
(e.g. to [40, 41], [0, 0.001], [-5000, -4999]).
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


_MAX_LATTICE_INDEX = 1 << 48  # |bin index| on value_range's lattice; float64 then places a score within 1/32 bin


class PixelMetricAccumulator:
    """Streaming pixel AUROC / AP / F1-max / PRO over a category, image by image, in O(bins) memory.

    ``update(map, mask)`` takes one H×W score map (any float dtype/range) and its bool mask of the same shape
    (resize one of them to the other first); ``compute()`` returns `PixelMetrics`. Three histograms of ``bins``
    entries are kept: anomalous-pixel counts, normal-pixel counts, and per-region overlap weights (each anomalous
    pixel adds 1/|its region|, so the cumulative sum above a threshold is the summed per-region overlap).

    The bins sit on a lattice: bin ``i`` covers ``[anchor + (offset + i) * width, ... + width)`` with ``width =
    unit * 2**level``. With ``value_range`` the lattice is that range's own bins (``anchor`` its low end, ``unit``
    its width / (bins - 1), level 0 = the range itself); without it, or for scores too far from it for float64
    bin indices, it is fitted to the first non-constant map's scores. Until a map with two different scores
    arrives, the counts of the single score seen are kept exactly, without bins. The first grid is the finest
    level that holds the scores seen (``value_range`` itself, offset 0, when they fill more than half of it); a
    score outside the grid re-places it at the finest level at or above the current one that holds every score so
    far (a shift of whole bins, or 2**k adjacent bins merged: exact), centred on them. Hence the scores span at
    least bins/2 - 1 bins once placed or re-placed, wherever they lie, and scores inside ``value_range`` never
    get coarser bins than its own.
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
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self._structure = _structure(connectivity)
        # the grid (none until two different scores were seen): see the class docstring
        self._anchor: float | None = None
        self._unit = 0.0
        self._level = 0
        self._offset = 0
        self._width = 0.0
        self._pos = np.zeros(bins, dtype=np.int64)
        self._neg = np.zeros(bins, dtype=np.int64)
        self._region = np.zeros(bins, dtype=np.float64)
        # while every score seen is one value: that value and its exact counts
        self._tie: float | None = None
        self._tie_pos = 0
        self._tie_neg = 0
        self._tie_region = 0.0
        self.n_regions = 0
        self.n_images = 0

    @property
    def bin_width(self) -> float:
        """The bins' width now; 0 while there are no bins (no scores, or one score value: counted exactly)."""
        return self._width

    @property
    def covered_range(self) -> tuple[float, float] | None:
        """The half-open score interval the histograms cover now (None while there are no bins)."""
        if self._anchor is None:
            return None
        low = self._anchor + self._offset * self._width
        return low, low + self._width * self.bins

    @property
    def growths(self) -> int:
        """Doublings of the bin width beyond the initial lattice's (``value_range``'s bins, or the fitted ones)."""
        return max(self._level, 0)

    # -------------------------------------------------------------------------------------------- the grid

    def _index(self, x: float, width: float) -> int:
        """The lattice index of the bin of ``x`` at ``width`` (the float64 arithmetic `_local` uses)."""
        return math.floor((x - self._anchor) / width)

    def _local(self, values: np.ndarray) -> np.ndarray:
        """Bin numbers of ``values`` in the current grid as float64 (outside [0, bins) where not covered)."""
        return np.floor((values - self._anchor) / self._width) - self._offset

    def _occupied(self) -> tuple[int, int, int] | None:
        """(first, last) occupied lattice index and their level, or None for empty histograms."""
        nz = np.flatnonzero(self._pos | self._neg)
        if nz.size == 0:
            return None
        return self._offset + int(nz[0]), self._offset + int(nz[-1]), self._level

    def _start_level(self, low: float, high: float) -> int:
        """A level at or below the finest one whose bins can hold [low, high] (the search starts there)."""
        finest = math.ceil(-1022 - math.log2(self._unit))  # bin widths stay normal floats
        if high <= low:
            return finest
        return max(finest, math.floor(math.log2((high - low) / self._unit) - math.log2(self.bins)) - 1)

    def _fit(self, hull: tuple[float, float] | None, level: int, occupied: Sequence[tuple[int, int, int]]
             ) -> tuple[int, int, int]:
        """(level, first index, last index): the finest level >= ``level`` at which the scores in ``hull`` and the
        occupied index ranges (each at its own level <= ``level``) fit into ``bins`` adjacent bins."""
        while True:
            width = self._unit * 2.0**level
            ends = [self._index(x, width) for x in hull] if hull else []
            for lo_i, hi_i, at in occupied:
                ends += [lo_i >> (level - at), hi_i >> (level - at)]
            first, last = min(ends), max(ends)
            if last - first < self.bins:
                return level, first, last
            level += 1

    def _centred(self, first: int, last: int) -> int:
        return first - (self.bins - 1 - (last - first)) // 2

    def _first_grid(self, low: float, high: float) -> None:
        """Place the first grid for scores spanning [low, high], low < high."""
        if self.value_range is not None:
            low_end, high_end = self.value_range
            self._anchor, self._unit = low_end, (high_end - low_end) / (self.bins - 1)
            try:
                level, first, last = self._fit((low, high), self._start_level(low, high), ())
            except OverflowError:  # (scores near the float64 limit, relative to value_range)
                level, first, last = 0, _MAX_LATTICE_INDEX + 1, 0
            if max(abs(first), abs(last)) <= _MAX_LATTICE_INDEX:
                inside = level == 0 and first >= 0 and last < self.bins
                self._set_grid(level, 0 if inside else self._centred(first, last))
                return
        # no value_range, or scores too far from it for exact float64 indices: a lattice fitted to them; (bins - 1)
        # steps span [low, high], so `high` lies inside the last half-open bin
        self._anchor, self._unit = low, (high - low) / (self.bins - 1)
        self._set_grid(0, 0)

    def _set_grid(self, level: int, offset: int) -> None:
        self._level, self._offset, self._width = level, offset, self._unit * 2.0**level

    def _regrid(self, hull: tuple[float, float] | None, others: Sequence[tuple[int, int, int]] = ()) -> None:
        """Re-place the grid at the finest level >= the current one that holds the scores in ``hull``, the counts
        and ``others`` (occupied index ranges about to be added), centred; the counts move exactly."""
        own = self._occupied()
        occupied = [*others, *([own] if own else [])]
        start = max([self._level, self._start_level(*hull) if hull else self._level] + [at for *_, at in others])
        level, first, last = self._fit(hull, start, occupied)
        offset = self._centred(first, last)
        if own is not None:
            src = np.arange(own[0] - self._offset, own[1] - self._offset + 1)
            dst = self._moved(src, self._offset, self._level, level, offset)
            self._pos, self._neg, self._region = self._carried(self, src, dst)
        self._set_grid(level, offset)

    def _carried(self, source: PixelMetricAccumulator, src: np.ndarray, dst: np.ndarray) -> list[np.ndarray]:
        """``source``'s three histograms, bins ``src`` carried into bins ``dst`` of a grid of ``bins``: exact."""
        carried = []
        for old in (source._pos, source._neg, source._region):
            moved = np.bincount(dst, weights=old[src], minlength=self.bins)  # sums of ints < 2**53: exact
            carried.append(moved if old.dtype == np.float64 else np.rint(moved).astype(np.int64))
        return carried

    def _add_at(self, i: int, pos: int, neg: int, region: float) -> None:
        self._pos[i] += pos
        self._neg[i] += neg
        self._region[i] += region

    def _moved(self, src: np.ndarray, offset: int, level: int, to_level: int, to_offset: int) -> np.ndarray:
        """Bin numbers ``src`` of a grid (offset, level) on this lattice, as bin numbers of (to_offset, to_level)."""
        shift = min(to_level - level, 62)  # indices stay far below 2**62, so a larger shift gives the same
        dst = ((src.astype(np.int64) + offset) >> shift) - to_offset
        if dst.size and (dst[0] < 0 or dst[-1] >= self.bins):
            raise AssertionError("internal error: re-placed bins do not hold the counts")
        return dst

    def _bins_for(self, values: np.ndarray, low: float, high: float) -> np.ndarray:
        """Bin numbers of ``values`` (min ``low``, max ``high``), placing or re-placing the grid as needed."""
        if self._anchor is None:
            tie = self._tie
            if tie is not None:
                low, high = min(low, tie), max(high, tie)
            self._first_grid(low, high)
            if tie is not None:  # the counts held exactly so far go into their bin now
                self._add_at(int(self._local(np.array([tie]))[0]), self._tie_pos, self._tie_neg, self._tie_region)
                self._tie, self._tie_pos, self._tie_neg, self._tie_region = None, 0, 0, 0.0
        with np.errstate(over="ignore"):
            idx = self._local(values)
        if idx.min() < 0 or idx.max() >= self.bins:
            try:
                self._regrid((low, high))
            except OverflowError:  # e.g. a first map in [1e-300, 2e-300], then one in [0, 1e6]
                raise ValueError(f"anomaly map scores [{low:.6g}, {high:.6g}] lie too far from the ones before "
                                 f"(bins of width {self._width:.3g}) for float64 bin indices; evaluate maps of "
                                 "comparable scale") from None
            idx = self._local(values)
        return idx.astype(np.int64)

    def _add_tied(self, value: float, pos: int, neg: int, region: float) -> None:
        """Add ``pos`` anomalous and ``neg`` normal pixels all scoring ``value`` (region weights summed)."""
        if self._anchor is None and (self._tie is None or self._tie == value):
            self._tie = value
            self._tie_pos += pos
            self._tie_neg += neg
            self._tie_region += region
            return
        self._add_at(int(self._bins_for(np.array([value]), value, value)[0]), pos, neg, region)

    # -------------------------------------------------------------------------------------------- public

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        m, g = _check_pair(anomaly_map, mask)
        self.n_images += 1
        if m.size == 0:
            return
        values = m.astype(np.float64, copy=False).ravel()
        flat = g.ravel()
        weights, n_regions = _region_weights(g, self._structure) if flat.any() else (np.zeros(0), 0)
        self.n_regions += n_regions
        low, high = float(values.min()), float(values.max())
        if low == high:  # one score value: exact counts (no grid needed while every score is that value)
            n_pos = int(flat.sum())
            self._add_tied(low, n_pos, int(flat.size) - n_pos, float(weights.sum()))
            return
        idx = self._bins_for(values, low, high)
        self._pos += np.bincount(idx[flat], minlength=self.bins)
        self._neg += np.bincount(idx[~flat], minlength=self.bins)
        if flat.any():
            self._region += np.bincount(idx[flat], weights=weights, minlength=self.bins)

    def merge(self, other: PixelMetricAccumulator) -> None:
        """Add another accumulator's counts, e.g. from a parallel worker: exact when both have the same bins and
        lattice (the same ``value_range``; or either has no grid yet), else a ValueError."""
        if other.bins != self.bins:
            raise ValueError("can only merge accumulators with the same number of bins")
        if other._tie is not None:
            self._add_tied(other._tie, other._tie_pos, other._tie_neg, other._tie_region)
        elif other._anchor is not None:
            if self._anchor is None:
                tie = (self._tie, self._tie_pos, self._tie_neg, self._tie_region)
                self._tie, self._tie_pos, self._tie_neg, self._tie_region = None, 0, 0, 0.0
                self._anchor, self._unit = other._anchor, other._unit
                self._set_grid(other._level, other._offset)
                self._pos, self._neg, self._region = other._pos.copy(), other._neg.copy(), other._region.copy()
                if tie[0] is not None:
                    self._add_tied(*tie)
            else:
                if (other._anchor, other._unit) != (self._anchor, self._unit):
                    raise ValueError("can only merge accumulators on the same bin lattice (the same value_range "
                                     "and scores near it)")
                theirs = other._occupied()
                if theirs is not None:
                    shift = self._level - theirs[2]
                    if shift < 0 or (theirs[0] >> shift) < self._offset \
                            or (theirs[1] >> shift) >= self._offset + self.bins:
                        self._regrid(None, [theirs])
                    src = np.arange(theirs[0] - other._offset, theirs[1] - other._offset + 1)
                    dst = self._moved(src, other._offset, other._level, self._level, self._offset)
                    for mine, added in zip((self._pos, self._neg, self._region), self._carried(other, src, dst),
                                           strict=True):
                        mine += added
        self.n_regions += other.n_regions
        self.n_images += other.n_images

    def compute(self) -> PixelMetrics:
        if self._anchor is not None:
            thresholds = (self._anchor + (self._offset + np.arange(self.bins)) * self._width)[::-1]  # lower edges
            pos, neg, region = self._pos[::-1], self._neg[::-1], self._region[::-1]
        elif self._tie is not None:  # every score one value: exact
            thresholds = np.array([self._tie])
            pos, neg = np.array([self._tie_pos]), np.array([self._tie_neg])
            region = np.array([self._tie_region])
        else:
            return PixelMetrics(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, 0.0, ("no pixels",))
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
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
