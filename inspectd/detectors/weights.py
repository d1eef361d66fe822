"""Where CLIP weights come from: resolving a tag or a path, known checkpoints and their sha256.

No machine without internet has real CLIP weights. A missing checkpoint is a `WeightsNotFoundError`
that names the file to get and the commands that get and check it; random weights only ever
arrive through the explicit ``pretrained: random`` demo setting, or as a checkpoint inspectd's own
generator wrote (marked, so results say ``demo_weights``: `marked_random`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

RANDOM_WEIGHTS = "random"

# open_clip's release URLs end with the first 8 hex digits of the file's sha256; these are the
# checkpoints inspectd's detectors default to (the table is extended from open_clip at runtime).
KNOWN_CHECKPOINTS: dict[tuple[str, str], dict[str, str]] = {
    ("ViT-B-16-plus-240", "laion400m_e31"): {
        "file": "vit_b_16_plus_240-laion400m_e31-8fb26589.pt",
        "sha256_prefix": "8fb26589",
    },
    ("ViT-B-16-plus-240", "laion400m_e32"): {
        "file": "vit_b_16_plus_240-laion400m_e32-699c4b84.pt",
        "sha256_prefix": "699c4b84",
    },
}

_URL_HASH = re.compile(r"-([0-9a-f]{8,64})\.(?:pt|pth|bin|safetensors)$")


class WeightsNotFoundError(RuntimeError):
    """The CLIP checkpoint is missing or unreachable; the message says how to get it."""


class RandomWeightsNotAllowed(RuntimeError):
    """``pretrained: random`` was asked for without the explicit demo flag."""


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights request: an open_clip tag, a local file, a local folder, or random."""

    kind: str  # "tag" | "file" | "dir" | "random"
    value: str


RANDOM_MARKER = "inspectd.random_weights"  # safetensors metadata key / open_clip_config.json key of seeded
#                                            random-weight checkpoints inspectd writes (tiny.write_tiny_checkpoint)


def marked_random(source: WeightsSource) -> bool:
    """True when a checkpoint file or folder carries the marker inspectd's random-weight generator writes (the
    safetensors header's metadata, or the folder's open_clip_config.json); reads headers only. Weights made
    random elsewhere carry no marker and cannot be told from trained ones."""
    if source.kind not in ("file", "dir"):
        return False
    path = Path(source.value)
    if source.kind == "dir":
        try:
            config = json.loads((path / "open_clip_config.json").read_text())
            if isinstance(config, dict) and config.get(RANDOM_MARKER):
                return True
        except (OSError, ValueError):
            pass
        files = sorted(path.glob("*.safetensors"))
    else:
        files = [path] if path.suffix == ".safetensors" else []
    for file in files:
        try:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                if (handle.metadata() or {}).get(RANDOM_MARKER) == "true":
                    return True
        except Exception:  # noqa: BLE001 - not a readable safetensors file: no marker
            continue
    return False


def looks_like_path(pretrained: str) -> bool:
    return (
        "/" in pretrained
        or "\\" in pretrained
        or pretrained.startswith(".")
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
    )


def resolve(arch: str, pretrained: str) -> WeightsSource:
    """Classify ``pretrained`` without touching the network; a missing local path fails here."""
    if pretrained == RANDOM_WEIGHTS:
        return WeightsSource("random", "")
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return WeightsSource("dir", str(path))
    if path.is_file():
        return WeightsSource("file", str(path))
    if looks_like_path(pretrained):
        raise WeightsNotFoundError(missing_message(arch, pretrained, f"no such file or folder: {path}"))
    return WeightsSource("tag", pretrained)


def known_checkpoint(arch: str, tag: str) -> dict[str, str] | None:
    """The file name and sha256 prefix of a released checkpoint, from our table or open_clip's."""
    if (arch, tag) in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[(arch, tag)]
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(arch, tag)
    except Exception:  # noqa: BLE001 - unknown arch names raise various errors
        return None
    url = (cfg or {}).get("url") or ""
    if not url:
        return None
    match = _URL_HASH.search(url)
    entry = {"file": url.rsplit("/", 1)[-1], "url": url}
    if match:
        entry["sha256_prefix"] = match.group(1)
    if cfg.get("hf_hub"):
        entry["hf_hub"] = cfg["hf_hub"]
    return entry


def missing_message(arch: str, pretrained: str, why: str) -> str:
    known = known_checkpoint(arch, pretrained) if not looks_like_path(pretrained) else None
    lines = [
        f"CLIP weights for arch={arch!r} pretrained={pretrained!r} are not available: {why}.",
        "inspectd never falls back to random weights. To get real weights:",
        f"  1. on a machine with internet: inspectd weights fetch {arch} "
        f"{pretrained if known else '<TAG>'} --out DIR",
        "  2. copy DIR to this machine and set model.pretrained to the file inside it",
        "  3. check the copy: inspectd weights verify FILE",
    ]
    if known:
        lines.append(f"The file is {known['file']}" + (f" (sha256 {known['sha256_prefix']}...)"
                                                       if "sha256_prefix" in known else ""))
    return "\n".join(lines)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | Path) -> tuple[bool | None, str]:
    """Check a checkpoint's sha256 against the known table: (True/False/None if unknown, message)."""
    path = Path(path)
    digest = sha256_of(path)
    name = path.name
    for (arch, tag), entry in KNOWN_CHECKPOINTS.items():
        prefix = entry["sha256_prefix"]
        if name == entry["file"] or digest.startswith(prefix):
            ok = digest.startswith(prefix)
            verdict = "OK" if ok else "MISMATCH (corrupt or different file)"
            return ok, f"{path}: sha256 {digest} — {arch} / {tag}: {verdict}"
    match = _URL_HASH.search(name)
    if match:
        ok = digest.startswith(match.group(1))
        return ok, f"{path}: sha256 {digest} — file name says {match.group(1)}: {'OK' if ok else 'MISMATCH'}"
    return None, f"{path}: sha256 {digest} — not a known checkpoint; nothing to compare against"


def pretrained_identity(arch: str, pretrained: str) -> str:
    """The weights' identity across machines: a tag, or a file/folder's name (paths differ per machine).

    A released checkpoint file (``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``) maps to its tag.
    """
    if not looks_like_path(pretrained):
        return pretrained
    name = Path(pretrained.rstrip("/\\")).name
    for (known_arch, tag), entry in KNOWN_CHECKPOINTS.items():
        if known_arch == arch and entry["file"] == name:
            return tag
    return name
