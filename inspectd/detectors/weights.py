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
from collections.abc import Mapping
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


class WeightsLoadError(WeightsNotFoundError):
    """The checkpoint is there but cannot be loaded (damaged, truncated, not a checkpoint, TorchScript, another
    arch); the message names the file, the arch and what to do."""


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


def pretrained_cfg(arch: str, tag: str) -> dict:
    """open_clip's pretrained registry entry of ``arch``/``tag`` (url, hf_hub, quick_gelu, ...), or {}."""
    try:
        import open_clip

        return dict(open_clip.get_pretrained_cfg(arch, tag) or {})
    except Exception:  # noqa: BLE001 - unknown arch names raise various errors
        return {}


def fetched_file_name(arch: str, tag: str, suffix: str = ".safetensors") -> str:
    """The name `inspectd weights fetch` gives a file it got from the Hugging Face hub, whose own names are
    generic (open_clip_model.safetensors): ``ViT-L-14-336-openai.safetensors``."""
    return f"{arch}-{tag}{suffix}"


def release_of(arch: str, file_name: str) -> tuple[str, dict] | None:
    """(tag, open_clip pretrained cfg) of the released checkpoint of ``arch`` that a file of this name is: a
    release URL's file name (``ViT-L-14-336px.pt``, ``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``) or the name
    `inspectd weights fetch` writes (`fetched_file_name`). None for other names (e.g. the hub's generic ones)."""
    for (known_arch, tag), entry in KNOWN_CHECKPOINTS.items():
        if known_arch == arch and entry["file"] == file_name:
            return tag, pretrained_cfg(arch, tag)
    try:
        from open_clip.pretrained import list_pretrained_tags_by_model

        tags = list_pretrained_tags_by_model(arch)
    except Exception:  # noqa: BLE001
        return None
    for tag in tags:
        cfg = pretrained_cfg(arch, tag)
        url = cfg.get("url") or ""
        if (url and url.rsplit("/", 1)[-1] == file_name) or Path(file_name).stem == fetched_file_name(arch, tag, ""):
            return tag, cfg
    return None


def prefer_hf_hub(cfg: Mapping[str, object], hub_installed: bool) -> bool:
    """Where `inspectd weights fetch` downloads from: the Hugging Face hub whenever the pretrained cfg names a
    hub repo (open_clip's hub copies are safetensors or plain state dicts, which inspectd loads without pickle;
    OpenAI's release URLs serve TorchScript archives, which it cannot load), else the release URL."""
    return bool(cfg.get("hf_hub")) and hub_installed


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (torch.jit.save's zip: code/ and constants.pkl; OpenAI's release .pt files
    are these). torch.load(weights_only=True) refuses them, and inspectd never loads code."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_failure_message(arch: str, pretrained: str, path: str | Path, exc: BaseException) -> str:
    """Why the checkpoint at ``path`` did not load into ``arch``, and what to do; never the advice to turn
    torch.load's weights_only off (that runs whatever code the file holds)."""
    path = Path(path)
    release = release_of(arch, path.name)
    tag = release[0] if release else "<TAG>"
    fetch = f"inspectd weights fetch {arch} {tag} --out DIR"
    if is_torchscript(path):
        return (f"CLIP weights {path} (arch={arch!r}) are a TorchScript archive (OpenAI's release .pt files are). "
                "inspectd loads weights as data only (safetensors, or torch.load with weights_only=True) and never "
                f"runs the code a TorchScript file holds. Get the same weights as a loadable file: `{fetch}` "
                "(downloads the Hugging Face hub's safetensors copy) and set model.pretrained to that file"
                + (f", or pretrained: {tag} where the hub cache has it" if release else "") + ".")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        size, head = -1, b""
    lowered = head.lstrip().lower()
    if size == 0:
        why = "the file is empty"
    elif lowered.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in lowered:
        why = ("it is an HTML page, not a checkpoint (a failed or redirected download saved under the checkpoint's "
               "name)")
    elif type(exc).__name__ == "SafetensorError":
        why = f"not a readable safetensors file, truncated or damaged ({error_summary(exc)})"
    elif isinstance(exc, AssertionError | KeyError) or "state_dict" in str(exc) or "size mismatch" in str(exc):
        why = (f"its tensors do not fit arch {arch!r} ({type(exc).__name__}: {error_summary(exc)}): a checkpoint of "
               "another model")
    elif path.suffix != ".safetensors" and _safetensors_header(head, size):
        why = (f"it is a safetensors file under another name (open_clip reads a file as safetensors only by the "
               f"suffix): rename it to {path.with_suffix('.safetensors').name}")
    elif head.startswith(b"PK") and "zip" not in path.suffix:
        if _zip_intact(path):  # the archive reads: what it holds is no CLIP state dict (a dict without tensors, ...)
            why = (f"the archive reads but holds no state dict of this model's tensors ({type(exc).__name__}: "
                   f"{error_summary(exc)}): not a CLIP checkpoint")
        else:
            why = f"a damaged or truncated PyTorch zip archive ({type(exc).__name__}: {error_summary(exc)})"
    elif "weights_only" in str(exc) or type(exc).__name__ == "UnpicklingError":  # (no raw message: torch's
        #                                                        advises weights_only=False there)
        why = (f"torch.load(weights_only=True) cannot read it ({type(exc).__name__}): not a plain checkpoint of "
               "tensors (a damaged file, or not a checkpoint at all)")
    else:
        why = f"{type(exc).__name__}: {error_summary(exc)}"
    return (f"CLIP weights {path} cannot be loaded into arch={arch!r}: {why}.\n"
            f"  check the file: inspectd weights verify {path}\n"
            f"  get a good copy on a machine with internet: {fetch}")


def _safetensors_header(head: bytes, size: int) -> bool:
    """Whether a file starting with ``head`` is laid out as safetensors: an 8-byte little-endian header length, then
    that many bytes of JSON."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 0 < length <= size - 8


def _zip_intact(path: Path) -> bool:
    """Whether ``path`` is a zip archive whose central directory and members read back (CRCs checked)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def error_summary(exc: BaseException) -> str:
    """The first line of an exception's message (never torch's advice to turn weights_only off)."""
    text = str(exc).strip()
    if "weights_only" in text:  # torch's advice to load without weights_only: never passed on
        return f"{type(exc).__name__} from torch.load(weights_only=True)"
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


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
    fetched = f" (writes DIR/{fetched_file_name(arch, pretrained)}, the hub's copy)" if known and known.get(
        "hf_hub") else ""
    lines = [
        f"CLIP weights for arch={arch!r} pretrained={pretrained!r} are not available: {why}.",
        "inspectd never falls back to random weights. To get real weights:",
        f"  1. on a machine with internet: inspectd weights fetch {arch} "
        f"{pretrained if known else '<TAG>'} --out DIR{fetched}",
        "  2. copy DIR to this machine and set model.pretrained to the file inside it",
        "  3. check the copy: inspectd weights verify FILE",
    ]
    if known:
        torchscript = "openaipublic" in known.get("url", "")
        lines.append(f"The release file is {known['file']}" + (f" (sha256 {known['sha256_prefix']}...)"
                                                               if "sha256_prefix" in known else "")
                     + ("; it is a TorchScript archive, which inspectd cannot load: use the hub's copy"
                        if torchscript else ""))
    return "\n".join(lines)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_note(path: str | Path) -> Path:
    """The ``FILE.sha256`` note `inspectd weights fetch` writes next to a download (``sha256sum -c`` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_sha256_note(path: str | Path) -> str:
    path = Path(path)
    digest = sha256_of(path)
    sha256_note(path).write_text(f"{digest}  {path.name}\n")
    return digest


def release_file_names() -> frozenset[str]:
    """The file names of open_clip's release URLs (``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``) and our table's."""
    names = {entry["file"] for entry in KNOWN_CHECKPOINTS.values()}
    try:
        import open_clip

        for arch, tag in open_clip.list_pretrained():
            url = pretrained_cfg(arch, tag).get("url") or ""
            if url:
                names.add(url.rsplit("/", 1)[-1])
    except Exception:  # noqa: BLE001 - no open_clip registry: our table only
        pass
    return frozenset(names)


def verify(path: str | Path) -> tuple[bool | None, str]:
    """Check a checkpoint's sha256 against the known table, the release file name's hash, or the ``FILE.sha256``
    note `inspectd weights fetch` wrote next to it: (True/False/None if unknown, message)."""
    path = Path(path)
    digest = sha256_of(path)
    name = path.name
    note = sha256_note(path)
    if note.is_file():
        recorded = (note.read_text().split() or [""])[0].lower()
        ok = recorded == digest
        return ok, (f"{path}: sha256 {digest} — {note.name} (written by `inspectd weights fetch`) says {recorded}: "
                    f"{'OK' if ok else 'MISMATCH (corrupt or different file)'}")
    for (arch, tag), entry in KNOWN_CHECKPOINTS.items():
        prefix = entry["sha256_prefix"]
        if name == entry["file"] or digest.startswith(prefix):
            ok = digest.startswith(prefix)
            verdict = "OK" if ok else "MISMATCH (corrupt or different file)"
            return ok, f"{path}: sha256 {digest} — {arch} / {tag}: {verdict}"
    match = _URL_HASH.search(name)
    if match and digest.startswith(match.group(1)):
        return True, f"{path}: sha256 {digest} — file name says {match.group(1)}: OK"
    # a differing suffix is a corrupt copy only in a release file's name: a name of one's own may end in 8 hex
    # digits that are no hash at all (a date: clip-ft-20240315.pt)
    if match and name in release_file_names():
        return False, f"{path}: sha256 {digest} — file name says {match.group(1)}: MISMATCH"
    suffix = f" (the -{match.group(1)} in its name is not its sha256 prefix)" if match else ""
    return None, f"{path}: sha256 {digest} — not a known checkpoint{suffix}; nothing to compare against"


def pretrained_identity(arch: str, pretrained: str) -> str:
    """The weights' name across machines: a tag, or a file/folder's name (paths differ per machine).

    A released checkpoint file (``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``, ``ViT-L-14-336px.pt``, or the
    name `inspectd weights fetch` gives a hub copy) maps to its tag. Only a name: two files of the same name may
    hold different weights (the backbone's ``weights_id`` tells them apart).
    """
    if not looks_like_path(pretrained):
        return pretrained
    name = Path(pretrained.rstrip("/\\")).name
    release = release_of(arch, name)
    return release[0] if release else name
