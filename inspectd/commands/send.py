"""``inspectd send``: XADD image files (or .npy raw pixel arrays) as frame messages to a line's stream."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from inspectd.streams.message import frame_fields
from inspectd.streams.redis_keys import DEFAULT_PREFIX, default_redis_url, frames_key


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("send", help="send image files as frames to a Redis stream",
                              description=__doc__.replace("``", "'"))
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG/JPEG/BMP/TIFF) or .npy arrays")
    p.add_argument("--product", required=True, help="product id")
    p.add_argument("--line", required=True, help="line id (also picks the stream unless --stream)")
    p.add_argument("--redis", default=default_redis_url(), help="Redis URL (default: $INSPECTD_REDIS_URL or local)")
    p.add_argument("--stream", help="stream key (default: <prefix>:{<line>}:frames)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default: %(default)s)")
    p.add_argument("--meta", default=None, help="JSON object attached to every frame")
    p.add_argument("--maxlen", type=int, default=None, help="trim the stream to ~N entries")
    p.add_argument("--frame-id", choices=("entry", "path"), default="entry",
                   help="frame_id of each frame: entry = the Redis entry id (the README's default; unique), "
                        "path = the file path as given (default: %(default)s)")
    p.set_defaults(func=run)


def _payload(path: Path) -> tuple[bytes, tuple[int, ...] | None, str | None]:
    if path.suffix.lower() != ".npy":
        return path.read_bytes(), None, None
    import numpy as np

    from inspectd.streams.codec import RAW_DTYPES, is_raw_shape

    arr = np.load(path, allow_pickle=False)
    if arr.dtype.kind != "u" or arr.dtype.itemsize not in (1, 2):  # a cast would send zeros (floats) or wrap (int32)
        raise ValueError(f".npy dtype {arr.dtype} is not pixels the daemon takes ({' or '.join(RAW_DTYPES)}): "
                         "scale and cast it first (e.g. (a * 255).round().astype('uint8') for floats in 0..1)")
    if not is_raw_shape(arr.shape):
        raise ValueError(f".npy shape {arr.shape} is not (H,W) or (H,W,1|3|4)")
    dtype = "uint16" if arr.dtype.itemsize == 2 else "uint8"  # big-endian uint16 is byte-swapped to little
    return np.ascontiguousarray(arr, dtype=f"<{'u2' if dtype == 'uint16' else 'u1'}").tobytes(), arr.shape, dtype


def run(args: argparse.Namespace) -> int:
    import redis

    meta = json.loads(args.meta) if args.meta else None
    if meta is not None and not isinstance(meta, dict):
        print("--meta must be a JSON object", file=sys.stderr)
        return 2
    stream = args.stream or frames_key(args.line, args.prefix)
    client = redis.Redis.from_url(args.redis)
    failed = 0
    try:
        for name in args.images:
            path = Path(name)
            try:
                payload, shape, dtype = _payload(path)
            except (OSError, ValueError) as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                failed += 1
                continue
            fields = frame_fields(args.product, args.line, str(path) if args.frame_id == "path" else "", payload,
                                  captured_at=time.time(), shape=shape, dtype=dtype,
                                  meta={"file": str(path), **(meta or {})})
            if args.frame_id == "entry":
                del fields["frame_id"]  # the daemon then uses the entry id, unique across folders and runs
            entry_id = client.xadd(stream, fields, maxlen=args.maxlen, approximate=True)
            print(f"{entry_id.decode()} {path} -> {stream}")
    finally:
        client.close()
    return 1 if failed else 0
