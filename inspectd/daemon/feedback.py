"""Operator feedback from the console, written where it teaches something, logged, counted and undoable.

- "false alarm" (the frame is good): its image goes into the product's references (``shots`` grows so the new
  image is used) or its calibration holdout (the threshold is re-calibrated with it), then the product hot
  reloads; a copy lands in ``<feedback_dir>/<product>/good/``. Only under ``registry.references_root`` when it is
  set: a product whose folder lies elsewhere moves to a copy there (the operator's folder is never written).
- "confirmed defect": the image goes to ``<feedback_dir>/<product>/<label>/`` and its mask (map >= threshold) to
  ``<feedback_dir>/<product>/masks/<label>/`` — the `folder` eval layout, so
  ``inspectd eval --dataset folder --root <feedback_dir>`` measures the real accuracy on the line (good/ is
  seeded with the product's references the first time).
- Every action is one JSON line in ``<feedback_dir>/feedback.jsonl``; undo deletes what the action wrote and puts
  back what it changed in the product's config, then rebuilds.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inspectd.daemon.config import DaemonConfig, ProductConfig
from inspectd.daemon.registry import BuildError, ProductRegistry, reference_files
from inspectd.daemon.review import ReviewItem
from inspectd.streams.records import safe_file_name

log = logging.getLogger(__name__)

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESERVED_LABELS = ("good", "masks", "mask", "ground_truth")
FALSE_ALARM = "false_alarm"
DEFECT = "defect"
TARGETS = ("references", "holdout")


def feedback_root(config: DaemonConfig) -> Path | None:
    """``console.feedback_dir``, else ``<registry.references_root>/_console``, else None (feedback off)."""
    if config.console.feedback_dir:
        return Path(config.console.feedback_dir)
    if config.registry.references_root:
        return Path(config.registry.references_root) / "_console"
    return None


class FeedbackError(Exception):
    """A feedback request that cannot be carried out; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FeedbackStore:
    """Carries out feedback actions against the registry and keeps their log."""

    def __init__(self, root: Path | None, registry: ProductRegistry, metrics: Any = None) -> None:
        self.root = root
        self.registry = registry
        self.metrics = metrics
        self._lock = asyncio.Lock()  # one feedback action at a time: undo and a new action never interleave
        self._file_lock = threading.Lock()

    @property
    def log_path(self) -> Path | None:
        return None if self.root is None else self.root / "feedback.jsonl"

    def _need_root(self) -> Path:
        if self.root is None:
            raise FeedbackError(409, "feedback is off: set console.feedback_dir (or registry.references_root)")
        return self.root

    # ---------------------------------------------------------------- actions
    async def false_alarm(self, item: ReviewItem, target: str, remote: str) -> dict[str, Any]:
        """Save the frame as a good image of its product (``target``: references | holdout) and rebuild."""
        if target not in TARGETS:
            raise FeedbackError(400, f"target must be one of {list(TARGETS)}, got {target!r}")
        async with self._lock:
            root = self._need_root()
            product = item.result["product"]
            entry = self.registry.get(product)
            if entry is None:
                raise FeedbackError(409, f"product {product!r} is not serving")
            before = entry.config
            config = copy.deepcopy(before)
            name = self._file_name(item)
            directory, seeded = await asyncio.to_thread(self._good_directory, config, target)
            written = [await asyncio.to_thread(_write, directory / name, item.image_png)]
            if target == "references":
                used = await asyncio.to_thread(reference_files, config.references, 10**6)
                config.shots = max(config.shots, [p.name for p in used].index(name) + 1)
            written.append(await asyncio.to_thread(_write, root / product / "good" / name, item.image_png))
            record = self._record(FALSE_ALARM, item, remote, target=target, files=written, before=before,
                                  after=config, version_before=entry.version, threshold_before=entry.threshold,
                                  seeded=[str(p) for p in seeded])
            try:
                new = await self.registry.put(config)
            except BuildError as exc:
                await asyncio.to_thread(_remove, written)
                raise FeedbackError(422, f"product {product!r} rejected the new image: {exc}") from exc
            await asyncio.to_thread(self.registry.save_product_file, config)
            record.update(version_after=new.version, threshold_after=new.threshold)
            return await self._finish(record, item)

    async def defect(self, item: ReviewItem, label: str, remote: str) -> dict[str, Any]:
        """Save the frame and its mask into the product's eval folder under ``label``."""
        if not LABEL_RE.match(label) or label.lower() in RESERVED_LABELS:
            raise FeedbackError(400, f"bad defect label {label!r}: letters, digits, '_' and '-' (max 64), not "
                                     f"{'/'.join(RESERVED_LABELS)}")
        async with self._lock:
            root = self._need_root()
            product = item.result["product"]
            folder = root / product
            name = self._file_name(item)
            seeded = await asyncio.to_thread(self._seed_goods, folder, product)  # kept by an undo
            written = [await asyncio.to_thread(_write, folder / label / name, item.image_png)]
            if item.amap is not None:
                mask = _defect_mask(item.amap, item.result["threshold"], tuple(item.result["size"]))
                written.append(await asyncio.to_thread(_write, folder / "masks" / label / name, mask))
            record = self._record(DEFECT, item, remote, label=label, files=written,
                                  seeded=[str(p) for p in seeded])
            return await self._finish(record, item)

    async def undo(self, feedback_id: str, remote: str) -> dict[str, Any]:
        """Reverse one action: delete its files, put back the config fields it changed, rebuild."""
        async with self._lock:
            records = await asyncio.to_thread(self.history)
            record = next((r for r in records if r["id"] == feedback_id), None)
            if record is None:
                raise FeedbackError(404, f"no feedback {feedback_id!r}")
            if record.get("undone"):
                raise FeedbackError(409, f"feedback {feedback_id!r} was already undone")
            await asyncio.to_thread(_remove, [Path(p) for p in record["files"]])
            undo: dict[str, Any] = {"id": uuid.uuid4().hex[:12], "at": time.time(), "action": "undo",
                                    "undoes": feedback_id, "item": record.get("item"), "product": record["product"],
                                    "remote": remote}
            if record["action"] == FALSE_ALARM:
                entry = self.registry.get(record["product"])
                if entry is not None:
                    config = copy.deepcopy(entry.config)
                    for key, value in record["config_before"].items():
                        _set(config, key, value)
                    new = await self.registry.put(config)
                    await asyncio.to_thread(self.registry.save_product_file, config)
                    undo.update(version_after=new.version, threshold_after=new.threshold)
            await asyncio.to_thread(self._append, undo)
            self._count(record["product"], "undo")
            log.info("console feedback %s undone (%s %s/%s) from %s", feedback_id, record["action"],
                     record["product"], record["frame_id"], remote)
            return undo

    # ---------------------------------------------------------------- the log
    def history(self, product: str | None = None) -> list[dict[str, Any]]:
        """Every action (newest last), each with ``undone`` set once an undo names it."""
        path = self.log_path
        if path is None or not path.exists():
            return []
        records, undone = [], set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if record.get("action") == "undo":
                undone.add(record.get("undoes"))
            else:
                records.append(record)
        for record in records:
            record["undone"] = record["id"] in undone
        return [r for r in records if product is None or r["product"] == product]

    def _record(self, action: str, item: ReviewItem, remote: str, *, files: list[Path],
                before: ProductConfig | None = None, after: ProductConfig | None = None,
                **extra: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex[:12], "at": time.time(), "action": action, "item": item.id,
            "product": item.result["product"],
            "line": item.result["line"], "frame_id": item.result["frame_id"], "entry_id": item.result["entry_id"],
            "score": item.result["score"], "threshold": item.result["threshold"],
            "state_version": item.result["state_version"], "files": [str(p) for p in files], "remote": remote,
            **extra,
        }
        if before is not None and after is not None:
            record["config_before"] = _changed(before, after)
        return record

    async def _finish(self, record: dict[str, Any], item: ReviewItem) -> dict[str, Any]:
        await asyncio.to_thread(self._append, record)
        self._count(record["product"], record["action"])
        item.feedback = record
        log.info("console feedback %s: %s on %s/%s (score %.4f, threshold %.4f) from %s -> %s", record["id"],
                 record["action"], record["product"], record["frame_id"], record["score"], record["threshold"],
                 record["remote"], ", ".join(record["files"]))
        return record

    def _append(self, record: dict[str, Any]) -> None:
        path = self._need_root() / "feedback.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._file_lock, path.open("ab") as handle:
            if handle.tell() and not _ends_with_newline(path):
                handle.write(b"\n")  # a torn line from a crash never swallows this record
            handle.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def _count(self, product: str, action: str) -> None:
        if self.metrics is not None:
            self.metrics.console_feedback.labels(product=product, action=action).inc()

    # ---------------------------------------------------------------- where files go
    def _file_name(self, item: ReviewItem) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(item.result["ts"] or time.time()))
        return f"fb-{stamp}-{safe_file_name(item.result['frame_id'])[:60]}-{item.id}.png"

    def _good_directory(self, config: ProductConfig, target: str) -> tuple[Path, list[Path]]:
        """Where a false alarm's image goes, and the images copied there first. The console writes only under
        ``registry.references_root`` when it is set (as directories set over the admin API): a product whose
        directory lies elsewhere gets a new one there, seeded with copies of what it used, and switches to it
        (the operator's own folder is never written). Without ``references_root``, the product's own folder."""
        key = "references" if target == "references" else "threshold.holdout_dir"
        current = config.references if target == "references" else config.threshold.holdout_dir
        root = self.registry.config.references_root
        if current and (root is None or Path(current).resolve().is_relative_to(Path(root).resolve())):
            return Path(current), []
        if root is None:
            raise FeedbackError(409, f"product {config.id!r} has no {key} directory and registry.references_root "
                                     "is not set: nowhere to save the frame")
        directory = Path(root) / (config.id if target == "references" else f"{config.id}-holdout")
        seeded: list[Path] = []
        if current:
            used = reference_files(current, config.shots if target == "references" else 10**6)
            directory.mkdir(parents=True, exist_ok=True)
            for path in used:
                if not (directory / path.name).exists():
                    shutil.copyfile(path, directory / path.name)
                    seeded.append(directory / path.name)
        if target == "references":
            config.references = str(directory)
        else:
            config.threshold.holdout_dir = str(directory)
        return directory, seeded

    def _seed_goods(self, folder: Path, product: str) -> list[Path]:
        """The eval folder needs good images: the first time, copy the product's references into good/."""
        good = folder / "good"
        if good.is_dir() and any(good.iterdir()):
            return []
        entry = self.registry.get(product)
        if entry is None or not entry.config.references:
            good.mkdir(parents=True, exist_ok=True)
            return []
        written = []
        for path in reference_files(entry.config.references, 10**6):
            target = good / path.name
            good.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written.append(target)
        return written


def _defect_mask(amap: np.ndarray, threshold: float, size: tuple[int, int]) -> bytes:
    """The operator-confirmed defect region: the map >= threshold at the image's size, as a 0/255 PNG."""
    binary = (np.asarray(amap, dtype=np.float32) >= threshold).astype(np.uint8) * 255
    image = Image.fromarray(binary).resize(size, Image.Resampling.NEAREST)
    from inspectd.streams.codec import encode_png

    return encode_png(np.asarray(image))


def _changed(before: ProductConfig, after: ProductConfig) -> dict[str, Any]:
    """The config fields feedback may change, as they were before (for undo)."""
    old, new = asdict(before), asdict(after)
    out: dict[str, Any] = {}
    for key in ("references", "shots"):
        if old[key] != new[key]:
            out[key] = old[key]
    if old["threshold"]["holdout_dir"] != new["threshold"]["holdout_dir"]:
        out["threshold.holdout_dir"] = old["threshold"]["holdout_dir"]
    return out


def _set(config: ProductConfig, key: str, value: Any) -> None:
    if key == "threshold.holdout_dir":
        config.threshold.holdout_dir = value
    else:
        setattr(config, key, value)


def _write(path: Path, data: bytes) -> Path:
    """Atomic write (a dot-prefixed temp name, which builds and the watcher ignore)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".feedback-{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"
