"""`inspectd run`: the daemon, from a config file or the embedded demo default."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

log = logging.getLogger("inspectd.run")
EXIT_LEFT_PENDING = 3  # frames were still in flight when shutdown_timeout_s ran out (they will be redelivered)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, as `http.port` is checked in a config (0 = any free one)."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be within [0, 65535] (0 = any free port), got {port}")
    return port


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the inspection daemon",
                                   description="Run the daemon. Without --config, --demo runs the embedded "
                                               "default (folder in, JSONL out, tiny random model).")
    parser.add_argument("--config", help="daemon YAML config (see config/inspectd.yaml)")
    parser.add_argument("--demo", action="store_true",
                        help="allow random weights (scores are meaningless); without --config: embedded default")
    parser.add_argument("--input", help="demo: folder of images to score (default: shared hazelnut_toy colour)")
    parser.add_argument("--references", help="demo: folder of good reference images")
    parser.add_argument("--out", default="runs/demo", help="demo: output folder (JSONL, masks, state cache)")
    parser.add_argument("--port", type=port_number, default=None, help="HTTP port for /metrics, /healthz, admin API")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = never)")
    parser.add_argument("--idle-exit", type=float, default=0.0,
                        help="stop after this many seconds with nothing in flight (0 = never)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config (daemon and products) without loading a model, list every problem, "
                             "exit 2 if any")
    parser.add_argument("--daemon-only", action="store_true",
                        help="with --check: leave products out (systemd's ExecStartPre: one product's missing "
                             "references must not keep the daemon and the other products from starting)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from inspectd.daemon.config import ConfigError, load_config
    from inspectd.daemon.demo import demo_config

    try:
        if args.config:
            config = load_config(args.config)
            config.demo = config.demo or args.demo
        elif args.demo:
            config = demo_config(args.input, args.references, args.out, port=args.port or 9464)
        else:
            print("inspectd run: give --config FILE, or --demo for the embedded default", file=sys.stderr)
            return 2
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.port is not None:
        config.http.port = args.port
    from inspectd.daemon.checks import check_config

    problems = check_config(config, products=not args.daemon_only)
    if args.check:
        for problem in problems:
            print(f"config error at {problem}", file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s) in the config", file=sys.stderr)
            return 2
        print("config OK")
        return 0
    own = check_config(config, products=False, models=False)
    if own:  # the daemon's own settings (no source, no sink, a missing folder): it cannot do its job (a model that
        #      cannot load fails below, with the loader's fuller message)
        for problem in own:
            print(f"config error at {problem}", file=sys.stderr)
        print(f"inspectd run: {len(own)} problem(s) in the daemon's settings; not starting (`--check` lists all)",
              file=sys.stderr)
        return 2
    for problem in problems:  # the daemon still starts: a bad product is visible in GET /products, not fatal
        log.warning("config problem: %s", problem)
    code = asyncio.run(serve(config, args.max_frames, args.idle_exit))
    if code == EXIT_LEFT_PENDING:
        # frames were still in flight at shutdown_timeout_s: do not wait for the engine thread's forward at
        # interpreter exit (it would overrun the limit); the pending entries are redelivered to the next instance
        logging.shutdown()
        os._exit(code)
    return code


async def serve(config, max_frames: int = 0, idle_exit: float = 0.0) -> int:  # noqa: ANN001
    from inspectd.daemon.app import InspectDaemon

    daemon = InspectDaemon(config)
    if max_frames or idle_exit:
        asyncio.get_running_loop().create_task(_auto_stop(daemon, max_frames, idle_exit))
    await daemon.run()
    return EXIT_LEFT_PENDING if daemon.left_pending else 0


async def _auto_stop(daemon, max_frames: int, idle_exit: float) -> None:  # noqa: ANN001
    import time

    while not daemon.started:
        await asyncio.sleep(0.1)
    idle_since = time.monotonic()
    last_done = -1
    while True:
        await asyncio.sleep(0.2)
        if max_frames and daemon.frames_done >= max_frames:
            break
        if daemon.frames_done != last_done or daemon._in_flight:
            last_done, idle_since = daemon.frames_done, time.monotonic()
        elif idle_exit and time.monotonic() - idle_since >= idle_exit:
            break
    log.info("stopping: %d frame(s) done", daemon.frames_done)
    daemon.request_stop()
