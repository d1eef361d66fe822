"""The ``inspectd`` console script: discovers sub-commands in :mod:`inspectd.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from inspectd import __version__, commands

DESCRIPTION = ("inspectd: streaming visual-inspection daemon (CLIP zero-/few-shot anomaly detection). "
               "'inspectd COMMAND --help' describes each command.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspectd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"inspectd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


class _QuietLibraries(logging.Filter):
    """open_clip logs its INFO chatter on the root logger; keep it (and other libraries' INFO) out unless -v."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("inspectd")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietLibraries())
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user; the traceback with -v
        if args.verbose:
            raise
        message = str(exc).strip() or type(exc).__name__
        print(f"inspectd {args.command}: {message}\n(run with -v for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
