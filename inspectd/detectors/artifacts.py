"""The one saved format: product states and learned parts (FFNs, adapters, prompts, decoders) as safetensors.

Every file carries one JSON header: what it is (``kind``), which detector and detector version wrote
it, the identity of the CLIP backbone it depends on, the config it was built with and a training
summary (data, loss curve). Writes are atomic (temp file + rename); loading checks the header
against what the caller expects and fails with a message naming both sides. No pickle, ever.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inspectd import atomic
from inspectd.detectors.weights import sha256_of

FORMAT = "inspectd-artifact"
FORMAT_VERSION = 2

PRODUCT_STATE = "product_state"  # one product's fitted state (+ its build record)
LEARNED = "learned"  # a detector's offline-trained part that products point to


class ArtifactError(ValueError):
    """A file that is not a readable inspectd artifact."""


class ArtifactMismatch(ArtifactError):
    """An artifact written for another backbone, detector or detector version than the one loading it."""


@dataclass
class Artifact:
    """Named tensors plus the header that says what they are and what they depend on."""

    kind: str
    detector: str
    detector_version: int
    tensors: dict[str, torch.Tensor]
    backbone: dict[str, Any] = field(default_factory=dict)  # `backbone_identity` of the CLIP it depends on
    config: dict[str, Any] = field(default_factory=dict)  # what it was built/trained with
    training: dict[str, Any] = field(default_factory=dict)  # data summary, loss curve, seed
    meta: dict[str, Any] = field(default_factory=dict)  # the detector's own JSON-able metadata
    content_hash: str = ""  # sha256 of the file it was read from / written to

    def header(self) -> dict[str, str]:
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": self.kind,
                "detector": self.detector, "detector_version": str(self.detector_version),
                "backbone": json.dumps(self.backbone, sort_keys=True), "config": json.dumps(self.config, default=str),
                "training": json.dumps(self.training, default=str), "meta": json.dumps(self.meta, default=str)}


def save_artifact(artifact: Artifact, path: str | Path) -> str:
    """Write atomically (a reader never sees a half-written file); returns and records the content hash."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in artifact.tensors.items()}
    with atomic.replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=artifact.header())
    artifact.content_hash = file_hash(path)
    return artifact.content_hash


def load_artifact(path: str | Path, device: torch.device | str = "cpu", *, kind: str | None = None,
                  detector: str | None = None, detector_version: int | None = None,
                  backbone: Mapping[str, Any] | None = None, refit_hint: str = "") -> Artifact:
    """Read an artifact and check it against the expectations given (each None = not checked).

    ``refit_hint`` (e.g. "re-run `inspectd fit randword --out FILE`") ends every mismatch message.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    hint = f"; {refit_hint}" if refit_hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"no artifact file {path}{hint}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc}){hint}") from exc
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an inspectd artifact (format {header.get('format')!r}, expected "
                            f"{FORMAT!r}; files written by inspectd before format {FORMAT_VERSION} cannot be read)"
                            f"{hint}")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: artifact format version {header.get('format_version')!r}; this inspectd "
                            f"reads {FORMAT_VERSION}{hint}")
    try:
        artifact = Artifact(kind=header["kind"], detector=header["detector"],
                            detector_version=int(header["detector_version"]), tensors=tensors,
                            backbone=json.loads(header.get("backbone", "{}")),
                            config=json.loads(header.get("config", "{}")),
                            training=json.loads(header.get("training", "{}")),
                            meta=json.loads(header.get("meta", "{}")), content_hash=file_hash(path))
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: damaged artifact header ({exc}){hint}") from exc
    if kind is not None and artifact.kind != kind:
        raise ArtifactMismatch(f"{path}: is a {artifact.kind!r} artifact, expected {kind!r}{hint}")
    if detector is not None and artifact.detector != detector:
        raise ArtifactMismatch(f"{path}: was written by detector {artifact.detector!r}, expected {detector!r}{hint}")
    if detector_version is not None and artifact.detector_version != detector_version:
        raise ArtifactMismatch(
            f"{path}: written by detector {artifact.detector!r} version {artifact.detector_version}, but this "
            f"inspectd's {artifact.detector!r} is version {detector_version}{hint}")
    if backbone is not None:
        check_backbone(artifact.backbone, backbone, where=str(path), hint=refit_hint)
    return artifact


def check_backbone(theirs: Mapping[str, Any], ours: Mapping[str, Any], where: str, hint: str = "") -> None:
    """Raise ArtifactMismatch naming both models unless ``theirs`` (recorded) is the same CLIP as ``ours``.

    The weights are compared by content (``weights_id``) where both sides record it, so the same weights given
    as a tag, a file or a folder match and two files of the same name with other weights do not; an artifact
    from before ``weights_id`` was recorded is compared by the weights' name. The activation (``quick_gelu``)
    changes every feature, so it is compared too (where recorded); the dtype is not.
    """
    by_content = "weights_id" in theirs and "weights_id" in ours
    keys = ("arch", "weights_id" if by_content else "weights", "quick_gelu", "embed_dim", "width")
    differs = [k for k in keys if k in theirs and k in ours and theirs[k] != ours[k]]
    if differs:
        suffix = f" {hint}." if hint else ""
        detail = ""
        if "weights_id" in differs:
            detail = (f" The weights differ in content: {theirs['weights_id']} (recorded) vs {ours['weights_id']} "
                      "(loaded), even where the file names agree.")
        if "quick_gelu" in differs:
            detail += (f" It was built with {'QuickGELU' if theirs['quick_gelu'] else 'GELU'}, the backbone runs "
                       f"{'QuickGELU' if ours['quick_gelu'] else 'GELU'} (model.quick_gelu).")
        raise ArtifactMismatch(
            f"{where} was built with CLIP {describe_backbone(theirs)} but the backbone is "
            f"{describe_backbone(ours)} (differs in {', '.join(differs)}); a learned part only works with the "
            f"CLIP it was built with.{detail}{suffix}")


def describe_backbone(identity: Mapping[str, Any]) -> str:
    return f"{identity.get('arch')}/{identity.get('weights')} (embed dim {identity.get('embed_dim')})"


def file_hash(path: str | Path) -> str:
    """sha256 of a file's content (the artifact's content hash; the same function checks downloaded weights)."""
    return sha256_of(path)


def quarantine(path: Path, why: str) -> Path | None:
    """Move an unreadable file aside (never delete a training result someone may want back) under a name of its
    own (``NAME.<time>-<id>.unreadable``, so an earlier quarantined copy is never overwritten), with the reason in
    ``<that>.why``. None when the file is already gone: another process sharing the folder moved it first."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.{stamp}-{uuid.uuid4().hex[:8]}.unreadable")
    try:
        path.replace(target)
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):  # the note is a courtesy; the file itself is safe
        target.with_name(f"{target.name}.why").write_text(why + "\n")
    return target
