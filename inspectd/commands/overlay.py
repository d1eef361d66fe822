"""`inspectd overlay`: heat-map overlays of anomaly masks on their frames, as PNG, for people to look at."""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

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


def overlay_name(product: str, frame_id: str, verdict: str, entry_id: str = "", tag: str = "") -> str:
    """``<product>/<frame id, readable><tag>.<verdict>.png``: unique per frame, no doubled suffixes (named as the
    JSONL sink names masks)."""
    from inspectd.streams.jsonl import frame_file_stem
    from inspectd.streams.records import safe_file_name

    return f"{safe_file_name(product)}/{frame_file_stem(frame_id, entry_id)}{tag}.{verdict or 'unknown'}.png"


def frame_file(record: dict[str, Any]) -> tuple[str | None, str]:
    """(the frame file of a result, "") or (None, why there is none). A watched folder moves its files on ack, after
    the result is published: then the file is at ``meta.done_path`` (results from before it was recorded: in
    ``done/`` under the folder ``source`` names), or at the ``<name>.<ns>.<suffix>`` a name taken there got. A
    folder's file must still have the mtime the result's ``ts`` is: one dropped again under its name is another."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    if not meta.get("path"):
        return None, "no frame file (Redis frames carry none: use `inspectd tail --save DIR`)"
    path, source, ts = Path(str(meta["path"])), str(record.get("source") or ""), record.get("ts")
    candidates, done = [path], None
    if source.startswith("folder:"):
        root = Path(source[len("folder:"):])
        if meta.get("done_path"):
            done = Path(str(meta["done_path"]))
        elif path.is_relative_to(root):
            done = root / "done" / path.relative_to(root)
    if done is not None:
        renamed = re.compile(re.escape(done.stem) + r"\.\d+" + re.escape(done.suffix))
        candidates.append(done)
        with suppress(OSError):
            candidates += sorted(p for p in done.parent.iterdir() if renamed.fullmatch(p.name))
    others = False
    for candidate in candidates:
        try:
            mtime = candidate.stat().st_mtime_ns / 1e9
        except OSError:
            continue
        if not source.startswith("folder:") or not isinstance(ts, int | float) or abs(mtime - ts) < 1e-6:
            return str(candidate), ""
        others = True
    return None, (f"frame file not found at {path}" + (f" nor in {done.parent}" if done is not None else "")
                  + (" (files there under its name have another mtime: other frames)" if others else ""))


def main(args: argparse.Namespace) -> int:
    if args.results:
        out_dir = Path(args.out)
        written = 0
        skipped = 0
        names: set[str] = set()
        for number, line in enumerate(Path(args.results).read_bytes().split(b"\n"), 1):
            if not line.strip():
                continue  # a blank line
            try:
                record = json.loads(line)
            except ValueError:  # a torn last line (a kill -9 mid-write), or not UTF-8
                record = None
            if not isinstance(record, dict):
                print(f"{args.results}:{number}: not JSON" + (" object" if record is not None else ""),
                      file=sys.stderr)
                skipped += 1
                continue
            if record.get("kind") != "result":
                continue
            if not record.get("mask_path"):
                image, why = None, "no mask" + (f" ({record['mask_note']})" if record.get("mask_note") else "")
            else:
                image, why = frame_file(record)
            if why:
                print(f"{record.get('frame_id')}: skipped: {why}", file=sys.stderr)
                skipped += 1
                continue
            threshold = args.threshold if args.threshold is not None else record.get("threshold")
            ids = (record["product"], str(record["frame_id"]), record.get("verdict", ""),
                   str(record.get("entry_id") or ""))
            name = overlay_name(*ids)
            if name in names:  # the same frame and entry id again (a folder file dropped again under its name)
                name = overlay_name(*ids, tag=f"_line{number}")
            names.add(name)
            try:
                render(image, record["mask_path"], out_dir / name, threshold, args.stretch, args.alpha,
                       score=record.get("score"), verdict=record.get("verdict"),
                       label=f"{record['product']} / {record['frame_id']}",
                       scale=float(record.get("mask_scale", 1.0)))
            except (OSError, ValueError) as exc:  # a mask file gone, a frame file that is no image
                print(f"{record.get('frame_id')}: skipped: cannot draw it ({exc})", file=sys.stderr)
                skipped += 1
                continue
            written += 1
        print(f"{written} overlay(s) in {out_dir}" + (f", {skipped} skipped (reasons above)" if skipped else ""))
        return 0 if written else 1
    if not args.image or not args.mask:
        print("give IMAGE --mask MASK.png, or --results FILE", file=sys.stderr)
        return 2
    print(render(args.image, args.mask, Path(args.out), args.threshold, args.stretch, args.alpha))
    return 0
