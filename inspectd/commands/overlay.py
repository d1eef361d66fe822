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
    parser.add_argument("--mask", help="mask PNG (8- or 16-bit: 0..max = map 0..mask_scale), e.g. from a result")
    parser.add_argument("--results", help="JSONL results file with mask_path and meta.path")
    parser.add_argument("--out", required=True, help="output PNG (single image) or folder (--results)")
    parser.add_argument("--threshold", type=float, default=None, help="outline map >= threshold")
    parser.add_argument("--stretch", action="store_true",
                        help="stretch each map to its own min..max (for low-contrast maps, e.g. demo weights)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.set_defaults(func=main)


def load_map(path: str | Path) -> np.ndarray:
    """A mask PNG (8- or 16-bit greyscale, as results carry it) as a float map in [0, 1]."""
    from inspectd.streams.codec import decode_mask_png

    return decode_mask_png(Path(path).read_bytes())[0]


def render(image: np.ndarray | str | Path, mask_path: str | Path, out: Path, threshold: float | None,
           stretch: bool, alpha: float, *, score: float | None = None, verdict: str | None = None,
           label: str = "", scale: float = 1.0) -> Path:
    """Overlay + legend. The threshold outline is kept under --stretch (drawn where the map, in its own scale,
    reaches the threshold); the legend states score vs threshold and the verdict."""
    from inspectd.streams.overlay import annotate, overlay

    rgb = np.asarray(Image.open(image).convert("RGB")) if isinstance(image, str | Path) else image
    amap = load_map(mask_path) * scale  # back on the detector's map scale (255 = the result's mask_scale)
    vmin, vmax = (float(amap.min()), float(amap.max()) + 1e-6) if stretch else (0.0, scale)
    drawn = overlay(rgb, amap, threshold, alpha=alpha, vmin=vmin, vmax=vmax)
    annotated = annotate(drawn, score=score, threshold=threshold, verdict=verdict, vmin=vmin, vmax=vmax, label=label)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(annotated).save(out)
    return out


def overlay_name(product: str, frame_id: str, verdict: str) -> str:
    """``<product>/<frame id, readable>.<verdict>.png``: unique per frame, no doubled suffixes."""
    from inspectd.streams.records import safe_file_name

    stem = frame_id[:-4] if frame_id.lower().endswith((".png", ".jpg", ".bmp")) else frame_id
    return f"{safe_file_name(product)}/{safe_file_name(stem)}.{verdict or 'unknown'}.png"


def main(args: argparse.Namespace) -> int:
    if args.results:
        out_dir = Path(args.out)
        written = 0
        skipped = 0
        for line in Path(args.results).read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") != "result":
                continue
            image = (record.get("meta") or {}).get("path")
            why = ("no mask" + (f" ({record['mask_note']})" if record.get("mask_note") else "")
                   if not record.get("mask_path") else
                   "no frame file (Redis frames carry none: use `inspectd tail --save DIR`)" if not image else "")
            if why:
                print(f"{record.get('frame_id')}: skipped: {why}", file=sys.stderr)
                skipped += 1
                continue
            threshold = args.threshold if args.threshold is not None else record.get("threshold")
            name = overlay_name(record["product"], str(record["frame_id"]), record.get("verdict", ""))
            render(image, record["mask_path"], out_dir / name, threshold, args.stretch, args.alpha,
                   score=record.get("score"), verdict=record.get("verdict"),
                   label=f"{record['product']} / {record['frame_id']}", scale=float(record.get("mask_scale", 1.0)))
            written += 1
        print(f"{written} overlay(s) in {out_dir}" + (f", {skipped} skipped (reasons above)" if skipped else ""))
        return 0 if written else 1
    if not args.image or not args.mask:
        print("give IMAGE --mask MASK.png, or --results FILE", file=sys.stderr)
        return 2
    print(render(args.image, args.mask, Path(args.out), args.threshold, args.stretch, args.alpha))
    return 0
