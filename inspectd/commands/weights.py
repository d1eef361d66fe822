"""`inspectd weights`: fetch CLIP checkpoints on a connected machine, verify copies, list known ones."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("weights", help="get and check CLIP checkpoints")
    sub = parser.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    fetch = sub.add_parser("fetch", help="download ARCH/TAG (needs internet) into --out")
    fetch.add_argument("arch")
    fetch.add_argument("tag")
    fetch.add_argument("--out", required=True, help="folder to write the checkpoint into")
    fetch.set_defaults(func=fetch_main)
    verify = sub.add_parser("verify", help="check a checkpoint file's sha256 against known checkpoints")
    verify.add_argument("file")
    verify.set_defaults(func=verify_main)
    listing = sub.add_parser("list", help="known checkpoints (arch, tag, file, sha256 prefix)")
    listing.set_defaults(func=list_main)


def fetch_main(args: argparse.Namespace) -> int:
    import open_clip
    from open_clip.pretrained import download_pretrained

    from inspectd.detectors import weights

    cfg = open_clip.get_pretrained_cfg(args.arch, args.tag)
    if not cfg:
        print(f"unknown open_clip checkpoint {args.arch}/{args.tag}; see `python -c \"import open_clip; "
              f"print(open_clip.list_pretrained())\"`", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Prefer the release URL: its file name carries the sha256 prefix that `verify` checks.
    path = Path(download_pretrained(cfg, prefer_hf_hub=not cfg.get("url"), cache_dir=str(out / ".download")))
    target = out / path.name
    shutil.copyfile(path, target)
    ok, message = weights.verify(target)
    print(message)
    print(f"\nCopy {target} to the inspection machine and set:\n  model:\n    arch: {args.arch}\n"
          f"    pretrained: /path/to/{target.name}")
    return 0 if ok is not False else 1


def verify_main(args: argparse.Namespace) -> int:
    from inspectd.detectors import weights

    if not Path(args.file).is_file():
        print(f"no such file: {args.file}", file=sys.stderr)
        return 2
    ok, message = weights.verify(args.file)
    print(message)
    return {True: 0, None: 0, False: 1}[ok]


def list_main(args: argparse.Namespace) -> int:
    from inspectd.detectors import weights

    for (arch, tag), entry in sorted(weights.KNOWN_CHECKPOINTS.items()):
        print(f"{arch:24s} {tag:16s} {entry['file']}  sha256 {entry['sha256_prefix']}...")
    return 0
