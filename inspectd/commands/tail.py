"""``inspectd tail``: print a line's results (or dead letters) one per line, optionally following.

``--json`` prints each entry as one JSON object (the mask as its byte count); ``--save DIR`` writes each
result's mask PNG to ``DIR/<product>/<frame>.mask.png`` and its overlay to ``<frame>.<verdict>.png`` (unique,
readable names, as the JSONL sink names masks: ``00.png`` -> ``00``, a short hash when the id had to be sanitised,
the entry id when frame ids repeat) and says for each result without one why not (its ``mask_note``)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from inspectd.streams.jsonl import frame_file_stem
from inspectd.streams.records import safe_file_name
from inspectd.streams.redis_keys import DEFAULT_PREFIX, dead_key, default_redis_url, results_key


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("tail", help="print results from a Redis results stream",
                              description="Print a line's results (or dead letters), optionally following; "
                                          "--json for one JSON object per entry, --save DIR for masks and overlays.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--line", help="line id: reads <prefix>:{<line>}:results")
    where.add_argument("--stream", help="stream key to read")
    p.add_argument("--redis", default=default_redis_url(), help="Redis URL (default: $INSPECTD_REDIS_URL or local)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default: %(default)s)")
    p.add_argument("--dead", action="store_true", help="read the line's dead-letter stream instead")
    p.add_argument("--count", type=int, default=10, help="how many recent entries to print first (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: stop after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per entry instead of a text line")
    p.add_argument("--save", metavar="DIR", help="write each result's mask PNG into DIR/<product>/")
    p.set_defaults(func=run)


def _s(fields: dict[bytes, bytes], name: str, default: str = "") -> str:
    value = fields.get(name.encode())
    return value.decode("utf-8", errors="replace") if value is not None else default


def _number(text: str) -> str:
    try:
        return f"{float(text):.4f}"
    except ValueError:
        return text or "?"


def format_entry(fields: dict[bytes, bytes]) -> str:
    """One result as ``<time> <frame_id> <product> <verdict> score=<s> threshold=<t> version=<v>``; dead letters as
    ``<frame_id> <product> DEAD <stage>/<reason> <detail>``."""
    frame_id, product = _s(fields, "frame_id", "-"), _s(fields, "product", "-")
    if b"reason" in fields and b"verdict" not in fields:
        return f"{frame_id} {product} DEAD {_s(fields, 'stage')}/{_s(fields, 'reason')} {_s(fields, 'detail')}"
    score = _number(_s(fields, "score", "?"))
    threshold = _number(_s(fields, "threshold"))
    when = _s(fields, "ts")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(when)))
    except ValueError:
        when = when or "-"
    line = (f"{when} {frame_id} {product} {_s(fields, 'verdict', '?')} score={score} threshold={threshold} "
            f"version={_s(fields, 'state_version')}")
    if _s(fields, "demo_weights") in ("1", "true"):
        line += " (demo weights)"
    return line


def entry_json(entry_id: str, fields: dict[bytes, bytes]) -> str:
    out: dict[str, Any] = {"entry": entry_id}
    for key, value in fields.items():
        name = key.decode(errors="replace")
        if name == "mask":
            out["mask_bytes"] = len(value)
            continue
        text = value.decode("utf-8", errors="replace")
        if name in ("timings", "meta", "fields"):
            try:
                out[name] = json.loads(text)
                continue
            except ValueError:
                pass
        out[name] = text
    return json.dumps(out, sort_keys=True)


def save_mask(directory: Path, fields: dict[bytes, bytes], frame_image: Any = None, entry: str = "") -> str:
    """Write the mask PNG of one result, and its overlay when the frame could be read back; returns what was done.
    ``entry``: the result's own entry id, which keeps apart frames whose ids repeat with no input entry id."""
    product, frame_id = _s(fields, "product", "unknown"), _s(fields, "frame_id", "frame")
    mask = fields.get(b"mask")
    if not mask:
        note = _s(fields, "mask_note") or "the result carries no mask"
        return f"{frame_id}: no mask saved ({note})"
    input_entry = _s(fields, "entry_id")
    # the input entry id keeps repeated frame ids apart (as in the JSONL sink's mask names); a folder's or camera's
    # entry id is the frame id itself, which repeats: there the result's own entry id does
    repeats = input_entry == frame_id and not _s(fields, "source").startswith("redis:")
    stem = frame_file_stem(frame_id, entry if repeats or not input_entry else input_entry)
    target = directory / safe_file_name(product) / f"{stem}.mask.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(mask)
    if frame_image is None:
        return f"{frame_id}: mask saved to {target} (no overlay: the frame is no longer in the input stream)"
    from inspectd.commands.overlay import render

    verdict = _s(fields, "verdict")
    try:
        threshold: float | None = float(_s(fields, "threshold"))
        score: float | None = float(_s(fields, "score"))
    except ValueError:
        threshold = score = None
    overlay = target.with_name(f"{stem}.{verdict or 'result'}.png")
    try:
        scale = float(_s(fields, "mask_scale", "1"))
    except ValueError:
        scale = 1.0
    render(frame_image, target, overlay, threshold, False, 0.5, score=score, verdict=verdict,
           label=f"{product} / {frame_id}", scale=scale)
    return f"{frame_id}: mask saved to {target}, overlay to {overlay}"


def frame_of(client: Any, results_stream: str, fields: dict[bytes, bytes]) -> Any:
    """The scored frame's RGB pixels, read back from its input stream by entry id (None once trimmed)."""
    from inspectd.streams.codec import decode_frame_image
    from inspectd.streams.message import parse_frame_fields
    from inspectd.streams.schema import Frame

    entry_id = _s(fields, "entry_id")
    if not re.fullmatch(r"\d+-\d+", entry_id) or not results_stream.endswith(":results"):  # folder/camera ids are
        #                                                       no stream entry ids (XRANGE would refuse them)
        return None
    frames_stream = results_stream[: -len("results")] + "frames"
    found = client.xrange(frames_stream, min=entry_id, max=entry_id, count=1)
    if not found:
        return None
    frame = parse_frame_fields(found[0][1], entry_id=entry_id, source="tail")
    if not isinstance(frame, Frame):
        return None
    try:
        return decode_frame_image(frame)
    except Exception:  # noqa: BLE001 - the mask alone is still worth saving
        return None


def emit(entry_id: str, fields: dict[bytes, bytes], args: argparse.Namespace, client: Any = None,
         stream: str = "") -> None:
    print(entry_json(entry_id, fields) if args.json else format_entry(fields), flush=True)
    if args.save and b"verdict" in fields:
        image = frame_of(client, stream, fields) if client is not None and fields.get(b"mask") else None
        print(save_mask(Path(args.save), fields, image, entry_id), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import redis

    if args.stream:
        stream = args.stream
    else:
        stream = (dead_key if args.dead else results_key)(args.line, args.prefix)
    client = redis.Redis.from_url(args.redis)
    try:
        recent = client.xrevrange(stream, count=args.count) if args.count > 0 else []
        for entry_id, fields in reversed(recent):
            emit(entry_id.decode(), fields, args, client, stream)
        if not args.follow:
            return 0
        newest = recent[:1] or client.xrevrange(stream, count=1)
        last_id = newest[0][0].decode() if newest else "0-0"
        deadline = time.monotonic() + args.timeout if args.timeout is not None else None
        while deadline is None or time.monotonic() < deadline:
            block_ms = 1000 if deadline is None else max(1, min(1000, int((deadline - time.monotonic()) * 1000)))
            reply = client.xread({stream: last_id}, block=block_ms, count=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    emit(entry_id.decode(), fields, args, client, stream)
                    last_id = entry_id.decode()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0
