"""Scoring a mixed batch: one backbone forward for all frames, then each product's detector.

Used by the daemon's engine and by offline evaluation alike (one implementation). `prepare` (CPU
pre-processing and tiling) is separate from `run` (the forward) so the engine can prepare the next
batch while the current one runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

from inspectd.detectors.backbone import ClipBackbone, FeatureRequest
from inspectd.detectors.base import Detector, ProductState
from inspectd.detectors.preprocess import Preprocessor, TileLayout, crop_views


@dataclass
class ScoreItem:
    """One frame to score with a product's detector and state."""

    detector: Detector
    state: ProductState
    image: np.ndarray | None = None  # HxWx3 uint8 RGB (may be dropped after `prepare`)
    tiles: torch.Tensor | None = None
    layout: TileLayout | None = None
    map_size: tuple[int, int] | None = None  # output map size; None = the frame's own size


@dataclass
class ScoreOutput:
    score: float
    map: np.ndarray | None  # float32 [H, W] in the detector's score range, or None


def prepare(preprocessor: Preprocessor, items: Sequence[ScoreItem]) -> None:
    """Tile every item's image in place (CPU work; safe to run in a worker thread)."""
    for item in items:
        if item.tiles is None:
            if item.image is None:
                raise ValueError("ScoreItem needs an image or precomputed tiles")
            item.tiles, item.layout = preprocessor(item.image)


def run(backbone: ClipBackbone, items: Sequence[ScoreItem], timings: dict[str, float] | None = None
        ) -> list[ScoreOutput]:
    """Score a batch: one forward over every tile, per-(detector, state) scoring, tiles merged back.

    ``timings``, when given, receives the seconds spent in the backbone forward and in scoring.
    """
    if not items:
        return []
    prepare(backbone.preprocessor, items)
    # Per item: its map tiles, then (multi-crop) crop views whose image scores are averaged in.
    views = [item.tiles if not item.detector.test_time_crops
             else torch.cat([item.tiles, crop_views(item.tiles, item.detector.test_time_crops)]) for item in items]
    map_tiles = [item.tiles.shape[0] for item in items]
    counts = [v.shape[0] for v in views]
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    request = reduce(FeatureRequest.__or__, (i.detector.feature_request(i.state) for i in items), FeatureRequest())
    started = time.perf_counter()
    features = backbone.forward(torch.cat(views), request)
    forwarded = time.perf_counter()

    groups: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((id(item.detector), id(item.state)), []).append(index)

    tile_scores: list[torch.Tensor | None] = [None] * len(items)
    tile_maps: list[torch.Tensor | None] = [None] * len(items)
    for members in groups.values():
        rows = [r for m in members for r in range(starts[m], starts[m + 1])]
        first = items[members[0]]
        group = features if len(members) == len(items) else features.select(rows)  # one product: no copy
        output = first.detector.score(group, first.state)
        offset = 0
        for m in members:
            n = counts[m]
            tile_scores[m] = output.scores[offset:offset + n]
            tile_maps[m] = None if output.maps is None else output.maps[offset:offset + map_tiles[m]]
            offset += n

    results = []
    for index, item in enumerate(items):
        score = float(tile_scores[index].float().mean().item())
        amap = None
        if tile_maps[index] is not None:
            merged = backbone.preprocessor.merge_maps(tile_maps[index], item.layout, item.map_size)
            amap = merged.float().cpu().numpy()
        results.append(ScoreOutput(score, amap))
    if timings is not None:
        timings["forward"] = forwarded - started
        timings["score"] = time.perf_counter() - forwarded
    return results
