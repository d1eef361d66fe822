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
    from open_clip.pretrained import download_pretrained, has_hf_hub

    from inspectd.detectors import weights

    cfg = open_clip.get_pretrained_cfg(args.arch, args.tag)
    if not cfg:
        print(f"unknown open_clip checkpoint {args.arch}/{args.tag}; see `python -c \"import open_clip; "
              f"print(open_clip.list_pretrained())\"`", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hub = weights.prefer_hf_hub(cfg, has_hf_hub())
    path = Path(download_pretrained(cfg, prefer_hf_hub=hub, cache_dir=str(out / ".download")))
    target = out / fetch_target_name(args.arch, args.tag, path, hub)
    shutil.copyfile(path, target)
    weights.sha256_note(target).unlink(missing_ok=True)  # a note of an earlier fetch describes another download
    if weights.is_torchscript(target):
        print(f"{target} is a TorchScript archive, which inspectd cannot load (it loads weights as data only); "
              "install huggingface_hub and fetch again to get the hub's safetensors copy", file=sys.stderr)
        return 1
    ok, message = weights.verify(target)  # a release file's name carries its sha256 prefix: checked first
    print(message)
    if ok is False:
        return 1
    digest = weights.write_sha256_note(target)
    print(f"sha256 {digest} recorded in {weights.sha256_note(target).name} (`inspectd weights verify` checks a copy "
          "against it: copy both files)")
    print(f"\nCopy {target} and {weights.sha256_note(target).name} to the inspection machine and set:\n  model:\n"
          f"    arch: {args.arch}\n    pretrained: /path/to/{target.name}")
    return 0


def fetch_target_name(arch: str, tag: str, downloaded: Path, from_hub: bool) -> str:
    """The fetched file's name: a release URL's own (it carries the sha256 prefix `verify` checks), or for a hub
    download, whose names are generic (open_clip_model.safetensors: two checkpoints would look alike),
    ``ARCH-TAG.<ext>``, which inspectd maps back to the release (quick_gelu, the weights' name)."""
    from inspectd.detectors import weights

    return weights.fetched_file_name(arch, tag, downloaded.suffix) if from_hub else downloaded.name


def verify_main(args: argparse.Namespace) -> int:
    from inspectd.detectors import weights

    if not Path(args.file).is_file():
        print(f"no such file: {args.file}", file=sys.stderr)
        return 2
    ok, message = weights.verify(args.file)
    print(message)
    if ok is None:  # a script's `verify && start` must not pass a file nothing vouched for
        print("not verified: keep the .sha256 note `inspectd weights fetch` wrote beside the file, or its release "
              "file name", file=sys.stderr)
    return {True: 0, None: 3, False: 1}[ok]


def list_main(args: argparse.Namespace) -> int:
    from inspectd.detectors import weights

    for (arch, tag), entry in sorted(weights.KNOWN_CHECKPOINTS.items()):
        print(f"{arch:24s} {tag:16s} {entry['file']}  sha256 {entry['sha256_prefix']}...")
    return 0
