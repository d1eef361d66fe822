"""Scoring a mixed batch: one backbone forward per (model, input, tower) group, then each product's detector.

Used by the daemon's engine, by building (calibration) and by offline evaluation alike (one
implementation). Each item's detector chooses its input (`Detector.input_spec`): `prepare` (CPU
pre-processing) is separate from `run` (the forwards) so the engine can prepare the next batch
while the current one runs. Products that share a model, an input size and a tower variant share
one forward, whatever their detectors and however their frames were cut.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inspectd.detectors.backbone import FeatureRequest
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
    prepared_by: Preprocessor | None = None  # what made ``tiles`` (None: ``tiles`` given for the detector)


@dataclass
class ScoreOutput:
    score: float
    map: np.ndarray | None  # float32 [H, W] in the detector's score range, or None


def prepare_item(item: ScoreItem) -> None:
    """Pre-process one item for its detector's input (CPU work; safe to run in a worker thread)."""
    preprocessor = item.detector.preprocessor
    if item.tiles is not None and item.prepared_by in (None, preprocessor):
        item.prepared_by = preprocessor
        return
    if item.image is None:
        raise ValueError("ScoreItem needs an image, or tiles made by its detector's pre-processor")
    item.tiles, item.layout = preprocessor(item.image)
    item.prepared_by = preprocessor


def prepare(items: Sequence[ScoreItem]) -> None:
    for item in items:
        prepare_item(item)


def forward_groups(items: Sequence[ScoreItem]) -> list[tuple[list[int], FeatureRequest]]:
    """(item indices, their merged feature request) per (model, input size, tower variant): each group is one
    backbone forward. Inputs of one size share it whether they were tiled or resized (a tensor of S x S inputs
    is all the tower sees)."""
    groups: dict[tuple, tuple[list[int], FeatureRequest]] = {}
    for index, item in enumerate(items):
        request = item.detector.feature_request(item.state)
        key = (id(item.detector.backbone), tuple(item.tiles.shape[-2:]), request.tower)
        members, merged = groups.get(key, ([], None))
        groups[key] = ([*members, index], request if merged is None else merged | request)
    return list(groups.values())


def run(items: Sequence[ScoreItem], timings: dict[str, float] | None = None) -> list[ScoreOutput]:
    """Score a batch: one forward per group, per-(detector, state) scoring, tiles merged back.

    ``timings``, when given, receives the seconds spent in the backbone forwards and in scoring.
    """
    if not items:
        return []
    prepare(items)
    tile_scores: list[torch.Tensor | None] = [None] * len(items)
    tile_maps: list[torch.Tensor | None] = [None] * len(items)
    started = time.perf_counter()
    forward_time = ForwardTime()
    for members, request in forward_groups(items):
        _run_group([items[m] for m in members], members, request, tile_scores, tile_maps, forward_time)
    results = []
    for index, item in enumerate(items):
        score = float(tile_scores[index].float().mean().item())
        amap = None
        if tile_maps[index] is not None:
            merged = item.detector.preprocessor.merge_maps(tile_maps[index], item.layout, item.map_size)
            amap = merged.float().cpu().numpy()
        results.append(ScoreOutput(score, amap))
    if timings is not None:  # (the results are on the host now: a GPU's work is done)
        timings["forward"] = forward_time.seconds()
        timings["score"] = max(0.0, time.perf_counter() - started - timings["forward"])
    return results


class ForwardTime:
    """Seconds the backbone forwards of one batch took. On CUDA a forward returns once its kernels are queued, so
    wall time would read launch time (and the rest land in scoring): CUDA events on the stream time it instead,
    read once the batch's results are on the host. Elsewhere, wall time."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def run(self, device: torch.device, forward: Callable[[], Any]) -> Any:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward()
            end.record()
            self.events.append((start, end))
            return out
        began = time.perf_counter()
        out = forward()
        self.wall_s += time.perf_counter() - began
        return out

    def seconds(self) -> float:
        for _, end in self.events:
            end.synchronize()
        return self.wall_s + sum(start.elapsed_time(end) for start, end in self.events) / 1000.0


def _run_group(items: Sequence[ScoreItem], positions: Sequence[int], request: FeatureRequest, tile_scores: list,
               tile_maps: list, forward_time: ForwardTime) -> None:
    """One forward for items sharing a model, input and tower; fills tile_scores/tile_maps at ``positions``."""
    backbone = items[0].detector.backbone
    # Per item: its map tiles, then (multi-crop) crop views whose image scores are averaged in.
    views = [item.tiles if not item.detector.test_time_crops
             else torch.cat([item.tiles, crop_views(item.tiles, item.detector.test_time_crops)]) for item in items]
    map_tiles = [item.tiles.shape[0] for item in items]
    counts = [v.shape[0] for v in views]
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    row_inputs = _row_inputs(items, counts)
    features = forward_time.run(backbone.device,  # (the pixels' copy to the device included)
                                lambda: backbone.forward(backbone.batch_pixels(views), request, row_inputs))

    by_state: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_state.setdefault((id(item.detector), id(item.state)), []).append(index)
    for members in by_state.values():
        rows = [r for m in members for r in range(starts[m], starts[m + 1])]
        first = items[members[0]]
        group = features if len(members) == len(items) else features.select(rows)  # one product: no copy
        output = first.detector.score(group, first.state)
        offset = 0
        for m in members:
            n = counts[m]
            tile_scores[positions[m]] = output.scores[offset:offset + n]
            tile_maps[positions[m]] = None if output.maps is None else output.maps[offset:offset + map_tiles[m]]
            offset += n


def _row_inputs(items: Sequence[ScoreItem], counts: Sequence[int]) -> dict[str, torch.Tensor] | None:
    """Per-row tower inputs (e.g. each product's visual prompts repeated over its rows), or None."""
    per_item = [item.detector.tower_inputs(item.state) for item in items]
    names = {name for inputs in per_item for name in inputs}
    if not names:
        return None
    out = {}
    for name in names:
        missing = [items[i].detector.name for i, inputs in enumerate(per_item) if name not in inputs]
        if missing:
            raise ValueError(f"tower input {name!r} missing for detector(s) {missing} in one forward group")
        out[name] = torch.cat([inputs[name].expand(n, *inputs[name].shape[1:])
                               for inputs, n in zip(per_item, counts, strict=True)])
    return out


def score_images(detector: Detector, state: ProductState, images: Sequence[np.ndarray],
                 chunk: int = 16) -> list[float]:
    """Image scores of frames under one product's state, in bounded chunks (calibration, eval)."""
    scores: list[float] = []
    for start in range(0, len(images), chunk):
        scores += [o.score for o in run([ScoreItem(detector, state, image) for image in images[start:start + chunk]])]
    return scores
