"""``inspectd product reload|put|delete``: XADD a command to the fleet control stream; every daemon applies it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from inspectd.streams.redis_keys import default_redis_url

DEFAULT_STREAM = "inspect:control"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("product", help="reload/put/delete a product on every daemon (control stream)",
                              description=__doc__.replace("``", "'"))
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis", default=default_redis_url(),
                        help="Redis URL (default: $INSPECTD_REDIS_URL or local)")
    common.add_argument("--stream", default=DEFAULT_STREAM, help="control stream key (default: %(default)s)")
    common.add_argument("--maxlen", type=int, default=10000,
                        help="trim the stream to ~N entries (default: %(default)s)")
    reload = ops.add_parser("reload", parents=[common], help="rebuild a product from its reference directory")
    reload.add_argument("product", metavar="ID")
    delete = ops.add_parser("delete", parents=[common], help="stop serving a product")
    delete.add_argument("product", metavar="ID")
    put = ops.add_parser("put", parents=[common], help="create/replace a product from a YAML file")
    put.add_argument("file", metavar="FILE", help="product YAML (relative paths resolve against its folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import redis

    from inspectd.daemon.config import ConfigError, load_product_file
    from inspectd.daemon.control import command_fields

    config: dict[str, Any] | None = None
    product = getattr(args, "product", None)
    if args.op == "put":
        from dataclasses import asdict

        from inspectd.daemon.checks import check_product

        try:
            loaded = load_product_file(Path(args.file))
        except (ConfigError, OSError) as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 2
        problems = check_product(loaded, None, Path(args.file).name)  # every daemon would reject it: say so here
        if problems:
            for problem in problems:
                print(f"config error at {problem}", file=sys.stderr)
            print(f"{args.file}: {len(problems)} problem(s); nothing sent", file=sys.stderr)
            return 2
        product, config = loaded.id, asdict(loaded)
    client = redis.Redis.from_url(args.redis)
    try:
        entry_id = client.xadd(args.stream, command_fields(args.op, product, config), maxlen=args.maxlen,
                               approximate=True)
    except redis.RedisError as exc:
        print(f"cannot send to {args.stream}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"{entry_id.decode()} {args.op} {product} -> {args.stream}")
    return 0
