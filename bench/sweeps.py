"""Cost growth sweeps of the scoring path (WinCLIP, the daemon's default detector): batch size, products per batch,
memory-bank size k (the nearest-neighbour search), frame size from 240 px to 4K (decode + pre-process + score) and
the number of models loaded at once.

    python -m bench.sweeps [--model tiny]      # prints the JSON rows
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import best_times, load_model
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, prepare, run
from inspectd.detectors.preprocess import Preprocessor
from inspectd.streams.codec import decode_frame_scaled, decode_image_bytes
from inspectd.streams.schema import Frame

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"
FRAME_SIZES = {"240 px": (240, 240), "512 px": (512, 512), "1080p": (1920, 1080), "4K": (3840, 2160)}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
PRODUCTS = (1, 2, 4, 8)
MEMORY_K = (1, 2, 4, 8, 16, 32, 64)
MODELS = (1, 2, 3)


def photos(folder: str, n: int, size: tuple[int, int] | None = (512, 512)) -> list[np.ndarray]:
    """``n`` hazelnut_toy photos (cycled when the folder has fewer), resized to ``size`` (width, height)."""
    paths = sorted((DATA / folder).glob("*.png"))
    out = []
    for i in range(n):
        image = Image.open(paths[i % len(paths)]).convert("RGB")
        out.append(np.asarray(image.resize(size, Image.BICUBIC) if size else image))
    return out


def rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float | None:
    """Resident set size now (VmRSS of /proc/self/status), in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# A sweep point: (sweep name, functions to time by measure name, the row from their best seconds).
Point = tuple[str, dict[str, Callable[[], object]], Callable[[dict[str, float]], dict[str, Any]]]


def _rate_point(sweep: str, items: list[ScoreItem], **row: Any) -> Point:
    prepare(items)

    def finish(best: dict[str, float]) -> dict[str, Any]:
        return {**row, "images_per_s": len(items) / best["run"], "ms_per_image": 1000 * best["run"] / len(items)}

    return sweep, {"run": lambda: run(items)}, finish


def batch_points(backbone: ClipBackbone, sizes: Sequence[int]) -> list[Point]:
    detector = create_detector("winclip", backbone)
    state = detector.fit(ProductSpec("p", "hazelnut"), photos("good", 4))
    frames = photos("colour", max(sizes))
    return [_rate_point("batch", [ScoreItem(detector, state, f) for f in frames[:b]], batch=b) for b in sizes]


def products_points(backbone: ClipBackbone, counts: Sequence[int], batch: int) -> list[Point]:
    """``batch`` frames spread over P products (each its own 4-shot state): one forward, P scoring passes."""
    detector = create_detector("winclip", backbone)
    references = photos("good", 4 * max(counts))
    states = [detector.fit(ProductSpec(f"p{i}", "hazelnut"), references[4 * i:4 * i + 4]) for i in range(max(counts))]
    frames = photos("colour", batch)
    return [_rate_point("products", [ScoreItem(detector, states[i % p], f) for i, f in enumerate(frames)],
                        products=p, batch=batch) for p in counts]


def memory_points(backbone: ClipBackbone, ks: Sequence[int], batch: int) -> list[Point]:
    """Scoring cost against the memory bank size: k references -> memory entries; "nn" times the few-shot
    association alone (every query patch/window against every stored one) on precomputed features."""
    detector = create_detector("winclip", backbone)
    references = photos("good", max(ks))
    frames = photos("colour", batch)
    points = []
    for k in ks:
        state = detector.fit(ProductSpec("p", "hazelnut"), references[:k])
        items = [ScoreItem(detector, state, f) for f in frames]
        sweep, fns, rate = _rate_point("memory", items, k=k)
        with torch.inference_mode():
            features = backbone.forward(torch.cat([item.tiles for item in items]), detector.feature_request(state))
        entries = sum(t.shape[0] for name, t in state.tensors.items() if name.startswith("memory_"))

        def nn(state: Any = state, features: Any = features) -> None:
            with torch.inference_mode():
                detector.few_shot_map(features, state)

        def finish(best: dict[str, float], rate: Any = rate, entries: int = entries) -> dict[str, Any]:
            return {**rate(best), "memory_entries": entries, "nn_ms_per_image": 1000 * best["nn"] / batch}

        points.append((sweep, {**fns, "nn": nn}, finish))
    return points


def frame_size_points(backbone: ClipBackbone, sizes: dict[str, tuple[int, int]], quality: int = 90) -> list[Point]:
    """One JPEG frame per size (a hazelnut photo scaled up): decode, pre-process (tile/resize), score, in ms."""
    detector = create_detector("winclip", backbone)
    state = detector.fit(ProductSpec("p", "hazelnut"), photos("good", 4))
    points = []
    for name, (width, height) in sizes.items():
        buffer = io.BytesIO()
        Image.fromarray(photos("colour", 1, (width, height))[0]).save(buffer, format="JPEG", quality=quality)
        payload = buffer.getvalue()
        image = decode_image_bytes(payload)
        tiles, layout = detector.preprocessor(image)
        item = ScoreItem(detector, state, tiles=tiles, layout=layout, map_size=(height, width))
        fast = Preprocessor(detector.preprocessor.size, mode=detector.preprocessor.mode, resize="fast")
        fns = {"decode": lambda payload=payload: decode_image_bytes(payload),
               "preprocess": lambda image=image: detector.preprocessor(image),
               # model.resize: fast, decode included (a JPEG decoded smaller; not in the total)
               "fast_decode_preprocess": lambda payload=payload, fast=fast: fast(*decode_frame_scaled(
                   Frame("p", "l", "f", 0.0, payload=payload), None, fast.decode_size)),
               "score": lambda item=item: run([item])}
        row = {"frame": name, "width": width, "height": height, "jpeg_bytes": len(payload),
               "tiles": int(tiles.shape[0])}

        def finish(best: dict[str, float], row: dict[str, Any] = row) -> dict[str, Any]:
            ms = {f"{k}_ms": 1000 * v for k, v in best.items()}
            return {**row, **ms, "total_ms": ms["decode_ms"] + ms["preprocess_ms"] + ms["score_ms"]}

        points.append(("frame_size", fns, finish))
    return points


def _extra_model(base: ClipBackbone, seed: int) -> ClipBackbone:
    """Another model like ``base`` (same arch, other random weights): what a second product line's CLIP costs."""
    return ClipBackbone(dataclasses.replace(base.spec, pretrained="random", demo=True, seed=seed))


def models_points(base: ClipBackbone, counts: Sequence[int], batch: int) -> list[Point]:
    """``batch`` frames spread over the products of M loaded models (one forward per model per batch); the load time
    and peak RSS after loading each extra model."""
    backbones, load_s, rss = [base], [0.0], [current_rss_mib()]
    for m in range(2, max(counts) + 1):
        started = time.perf_counter()
        backbones.append(_extra_model(base, seed=m))
        load_s.append(time.perf_counter() - started)
        rss.append(current_rss_mib())
    detectors = [create_detector("winclip", b) for b in backbones]
    references = photos("good", 4)
    states = [d.fit(ProductSpec(f"p{i}", "hazelnut"), references) for i, d in enumerate(detectors)]
    frames = photos("colour", batch)
    return [_rate_point("models", [ScoreItem(detectors[i % m], states[i % m], f) for i, f in enumerate(frames)],
                        models=m, batch=batch, load_s=load_s[m - 1], rss_mib=rss[m - 1]) for m in counts]


def run_sweeps(backbone: ClipBackbone, quick: bool, rounds: int = 5, min_round_s: float = 0.05) -> dict[str, Any]:
    """Every sweep on ``backbone``; every point of every sweep is timed in turn, ``rounds`` times (best of), so a busy
    spell of this VM's neighbours hits a few samples of many points, not all of one. Quick stops batches at 32."""
    started = time.perf_counter()
    weights = "random" if backbone.spec.pretrained == "random" else "seeded tiny checkpoint" \
        if backbone.spec.arch == "inspectd-tiny" else backbone.spec.pretrained
    out: dict[str, Any] = {"model": f"{backbone.spec.arch} ({weights} weights, {backbone.describe().get('kernels')})",
                           "detector": "winclip (4-shot unless the sweep varies k)", "repeats": rounds}
    points = batch_points(backbone, tuple(b for b in BATCHES if not quick or b <= 32))
    points += products_points(backbone, PRODUCTS, 8)
    points += memory_points(backbone, MEMORY_K, 4)
    points += frame_size_points(backbone, FRAME_SIZES)
    points += models_points(backbone, MODELS, 6)
    fns = {(i, name): fn for i, (_, measures, _) in enumerate(points) for name, fn in measures.items()}
    best = best_times(fns, rounds, min_round_s)
    for i, (sweep, measures, finish) in enumerate(points):
        out.setdefault(sweep, []).append(finish({name: best[(i, name)] for name in measures}))
    out["seconds"] = time.perf_counter() - started
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny or an open_clip arch (random weights)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_sweeps(load_model(args.model, Path(tmp)), args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
