"""`inspectd overlay`: heat-map overlays of anomaly masks on their frames, as PNG, for people to look at."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "overlay", help="draw anomaly masks over frames (PNG)",
        description="Either IMAGE --mask MASK.png --out OUT.png, or --results results.jsonl --out DIR "
                    "(uses each result's frame path and mask_path, as written by the JSONL sink).")
    parser.add_argument("image", nargs="?", help="frame image")
    parser.add_argument("--mask", help="mask PNG (8-bit: 0..255 = score 0..1), e.g. from a result")
    parser.add_argument("--results", help="JSONL results file with mask_path and meta.path")
    parser.add_argument("--out", required=True, help="output PNG (single image) or folder (--results)")
    parser.add_argument("--threshold", type=float, default=None, help="outline map >= threshold")
    parser.add_argument("--stretch", action="store_true",
                        help="stretch each map to its own min..max (for low-contrast maps, e.g. demo weights)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.set_defaults(func=main)


def load_map(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def render(image_path: str | Path, mask_path: str | Path, out: Path, threshold: float | None, stretch: bool,
           alpha: float) -> Path:
    from inspectd.streams.overlay import save_overlay

    image = np.asarray(Image.open(image_path).convert("RGB"))
    amap = load_map(mask_path)
    vmin, vmax = (float(amap.min()), float(amap.max()) + 1e-6) if stretch else (0.0, 1.0)
    return save_overlay(out, image, amap, threshold, alpha=alpha, vmin=vmin, vmax=vmax)


def main(args: argparse.Namespace) -> int:
    if args.results:
        out_dir = Path(args.out)
        written = 0
        for line in Path(args.results).read_text().splitlines():
            record = json.loads(line)
            image = (record.get("meta") or {}).get("path")
            if record.get("kind") != "result" or not record.get("mask_path") or not image:
                continue
            threshold = args.threshold if args.threshold is not None else (
                None if args.stretch else record.get("threshold"))
            name = f"{record['product']}_{Path(record['frame_id']).stem}_{record['verdict']}.png"
            render(image, record["mask_path"], out_dir / name, threshold, args.stretch, args.alpha)
            written += 1
        print(f"{written} overlay(s) in {out_dir}")
        return 0 if written else 1
    if not args.image or not args.mask:
        print("give IMAGE --mask MASK.png, or --results FILE", file=sys.stderr)
        return 2
    print(render(args.image, args.mask, Path(args.out), args.threshold, args.stretch, args.alpha))
    return 0
