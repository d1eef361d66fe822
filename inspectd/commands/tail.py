"""``inspectd tail``: print a line's results (or dead letters) one per line, optionally following."""

from __future__ import annotations

import argparse
import time
from typing import Any

from inspectd.streams.redis_keys import DEFAULT_PREFIX, dead_key, default_redis_url, results_key


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("tail", help="print results from a Redis results stream", description=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--line", help="line id: reads <prefix>:{<line>}:results")
    where.add_argument("--stream", help="stream key to read")
    p.add_argument("--redis", default=default_redis_url(), help="Redis URL (default: $INSPECTD_REDIS_URL or local)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default: %(default)s)")
    p.add_argument("--dead", action="store_true", help="read the line's dead-letter stream instead")
    p.add_argument("--count", type=int, default=10, help="how many recent entries to print first (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: stop after this many seconds")
    p.set_defaults(func=run)


def _s(fields: dict[bytes, bytes], name: str, default: str = "") -> str:
    value = fields.get(name.encode())
    return value.decode("utf-8", errors="replace") if value is not None else default


def format_entry(fields: dict[bytes, bytes]) -> str:
    """One result as ``<frame_id> <product> <verdict> score=<s> version=<v>``; dead letters as
    ``<frame_id> <product> DEAD <stage>/<reason> <detail>``."""
    frame_id, product = _s(fields, "frame_id", "-"), _s(fields, "product", "-")
    if b"reason" in fields and b"verdict" not in fields:
        return f"{frame_id} {product} DEAD {_s(fields, 'stage')}/{_s(fields, 'reason')} {_s(fields, 'detail')}"
    try:
        score = f"{float(_s(fields, 'score')):.4f}"
    except ValueError:
        score = _s(fields, "score", "?")
    line = f"{frame_id} {product} {_s(fields, 'verdict', '?')} score={score} version={_s(fields, 'state_version')}"
    if _s(fields, "demo_weights") == "1":
        line += " (demo weights)"
    return line


def run(args: argparse.Namespace) -> int:
    import redis

    if args.stream:
        stream = args.stream
    else:
        stream = (dead_key if args.dead else results_key)(args.line, args.prefix)
    client = redis.Redis.from_url(args.redis)
    try:
        recent = client.xrevrange(stream, count=args.count) if args.count > 0 else []
        for _entry_id, fields in reversed(recent):
            print(format_entry(fields), flush=True)
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
                    print(format_entry(fields), flush=True)
                    last_id = entry_id.decode()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0
