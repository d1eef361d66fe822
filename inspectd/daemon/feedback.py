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
import io
import json
import logging
import math
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

from inspectd import atomic
from inspectd.daemon.config import DaemonConfig, ProductConfig
from inspectd.daemon.registry import PRODUCT_ID_RE, BuildError, BuildSuperseded, ProductRegistry, reference_files
from inspectd.daemon.review import ORIGINAL_SUFFIXES, ReviewItem
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

    def __init__(self, root: Path | None, registry: ProductRegistry, metrics: Any = None,
                 max_pixels: int | None = None) -> None:
        """``max_pixels``: the largest frame a defect's mask is drawn for (the daemon's ``decode.max_pixels``; None:
        Pillow's decompression-bomb bound)."""
        self.root = root
        self.max_pixels = max_pixels
        self.registry = registry
        self.metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}  # per product: its actions and undos never interleave
        self._file_lock = threading.Lock()
        self._target_cache: dict[str, str] | None = None

    @property
    def log_path(self) -> Path | None:
        return None if self.root is None else self.root / "feedback.jsonl"

    def _need_root(self) -> Path:
        if self.root is None:
            raise FeedbackError(409, "feedback is off: set console.feedback_dir (or registry.references_root)")
        return self.root

    def _product(self, item: ReviewItem) -> str:
        """The item's product, refused unless it is a plain id the registry knows (an item read back from Redis
        carries whatever was written there: its product never becomes a path without this check)."""
        product = str(item.result.get("product", ""))
        if not PRODUCT_ID_RE.match(product) or self.registry.status(product) is None:
            raise FeedbackError(409, f"product {product[:80]!r} is not a product of this daemon")
        return product

    def _lock(self, product: str) -> asyncio.Lock:
        return self._locks.setdefault(product, asyncio.Lock())

    # ---------------------------------------------------------------- where a product's false alarms go
    def target_for(self, product: str) -> str:
        """The operator's choice for ``product`` (references | holdout), kept in ``<feedback_dir>/targets.json``."""
        return self._targets().get(product, "references")

    def set_target(self, product: str, target: str) -> None:
        if target not in TARGETS:
            raise FeedbackError(400, f"target must be one of {list(TARGETS)}, got {target!r}")
        root = self._need_root()
        targets = {**self._targets(), product: target}
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(root / "targets.json", json.dumps(targets, indent=1, sort_keys=True).encode())
        self._target_cache = targets

    def _targets(self) -> dict[str, str]:
        """The choices, read from the file once (every overview asks; the file changes only through us)."""
        if self._target_cache is None:
            try:
                data = json.loads((self.root / "targets.json").read_text()) if self.root else {}
            except (OSError, json.JSONDecodeError):
                data = {}
            self._target_cache = ({str(k): v for k, v in data.items() if v in TARGETS}
                                  if isinstance(data, dict) else {})
        return self._target_cache

    # ---------------------------------------------------------------- actions
    async def false_alarm(self, item: ReviewItem, target: str | None, remote: str) -> dict[str, Any]:
        """Save the frame as a good image of its product (``target``: references | holdout, default the product's
        choice) and rebuild."""
        target = target or self.target_for(str(item.result.get("product", "")))
        if target not in TARGETS:
            raise FeedbackError(400, f"target must be one of {list(TARGETS)}, got {target!r}")
        root = self._need_root()
        product = self._product(item)
        fields = _summary_fields(item)  # before anything is written: a summary without them saves nothing
        async with self._lock(product):
            entry = self.registry.get(product)
            if entry is None:
                raise FeedbackError(409, f"product {product!r} is not serving")
            name = self._file_name(item)
            data = item.original or item.image_png
            config = copy.deepcopy(self._wanted(product, entry))
            directory, seeded = await asyncio.to_thread(self._good_directory, config, target, name)
            written = await _write_all([(directory / name, data), (_inside(root, product, "good", name), data)])
            before = self._wanted(product, entry)
            if target == "references":  # the images used so far stay used, and the new one joins them
                used = {p.name for p in await asyncio.to_thread(reference_files, before.references, before.shots)}
                names = [p.name for p in await asyncio.to_thread(reference_files, config.references, 10**6)]
                config.shots = max(names.index(n) for n in (used | {name}) if n in names) + 1
            record = self._record(FALSE_ALARM, item, fields, remote, target=target, files=written, before=before,
                                  after=config, version_before=entry.version, threshold_before=entry.threshold,
                                  seeded=[str(p) for p in seeded], saved_size="original" if item.original else
                                  "review")
            new = await self._rebuild(product, config, before, written)
            record.update(version_after=new.version, threshold_after=new.threshold)
            return await self._finish(record, item)

    async def defect(self, item: ReviewItem, label: str, remote: str) -> dict[str, Any]:
        """Save the frame and its mask into the product's eval folder under ``label``."""
        if not LABEL_RE.match(label) or label.lower() in RESERVED_LABELS:
            raise FeedbackError(400, f"bad defect label {label!r}: letters, digits, '_' and '-' (max 64), not "
                                     f"{'/'.join(RESERVED_LABELS)}")
        root = self._need_root()
        product = self._product(item)
        fields = _summary_fields(item)
        async with self._lock(product):
            folder = _inside(root, product)
            name = self._file_name(item)
            seeded = await asyncio.to_thread(self._seed_goods, folder, product)  # kept by an undo
            image = item.original or item.image_png
            # the mask fits the image saved (the frame as scored, or without its original the review image): its
            # size is read from that image, never from the summary (from Redis: any size anyone wrote there);
            # drawn before anything is written, so a mask that cannot be leaves no image behind
            mask = None if item.amap is None else await asyncio.to_thread(
                _defect_mask, item.amap, fields["threshold"], _image_size(image, self.max_pixels))
            written = await _write_all([(folder / label / name, image)]
                                       + ([] if mask is None else [(folder / "masks" / label / name, mask)]))
            record = self._record(DEFECT, item, fields, remote, label=label, files=written,
                                  seeded=[str(p) for p in seeded])
            return await self._finish(record, item)

    async def undo(self, feedback_id: str, remote: str) -> dict[str, Any]:
        """Reverse one action: set its files aside, put back what it changed in the config (only where nothing
        changed it since), rebuild; a rebuild that fails puts the files back and changes nothing."""
        records = await asyncio.to_thread(self.history)
        record = next((r for r in records if r["id"] == feedback_id), None)
        if record is None:
            raise FeedbackError(404, f"no feedback {feedback_id!r}")
        product = record["product"]
        async with self._lock(product):
            if any(r["id"] == feedback_id and r["undone"] for r in await asyncio.to_thread(self.history)):
                raise FeedbackError(409, f"feedback {feedback_id!r} was already undone")
            aside = await asyncio.to_thread(_set_aside, [Path(p) for p in record["files"]])
            undo: dict[str, Any] = {"id": uuid.uuid4().hex[:12], "at": time.time(), "action": "undo",
                                    "undoes": feedback_id, "item": record.get("item"), "product": product,
                                    "remote": remote}
            entry = self.registry.get(product)
            if record["action"] == FALSE_ALARM and entry is not None:
                config = copy.deepcopy(self._wanted(product, entry))
                # a folder this action moved the product to stays while later false alarms saved into it: moving
                # back would drop their images (and raise shots over images the old folder leaves out)
                later = records[records.index(record) + 1:]
                in_use = {str(Path(r["files"][0]).parent) for r in later
                          if r["product"] == product and r["action"] == FALSE_ALARM and r["files"] and not r["undone"]}
                kept = _revert(config, record.get("config_before", {}), record.get("config_after", {}), in_use)
                try:
                    new = await self._rebuild(product, config, self._wanted(product, entry), [])
                except FeedbackError:
                    await asyncio.to_thread(_restore, aside)
                    raise
                undo.update(version_after=new.version, threshold_after=new.threshold, kept=kept)
            await asyncio.to_thread(_remove, [tmp for tmp, _ in aside])
            await asyncio.to_thread(self._append, undo)
            self._count(product, "undo")
            log.info("console feedback %s undone (%s %s/%r) from %s", feedback_id, record["action"], product,
                     record["frame_id"], remote)
            return undo

    def _wanted(self, product: str, entry: Any) -> ProductConfig:
        """The newest config asked for (a build may be running for it), else the serving one."""
        return self.registry.wanted(product) or entry.config

    async def _rebuild(self, product: str, config: ProductConfig, before: ProductConfig,
                       written: list[Path]) -> Any:
        """Save the product file, then build ``config``. The file goes first, so the file watcher, noticing our
        writes, rebuilds this same config; when it (or anyone) stops our build, wait for the newest one and accept
        it if it serves our change. On failure the written files go and the product file is put back."""
        warning = await asyncio.to_thread(self._persist, config)
        try:
            try:
                return await self.registry.put(config)
            except BuildSuperseded:
                entry = await self.registry.settled(product)
                if entry is not None and _same_feedback_fields(entry.config, config):
                    return entry
                raise FeedbackError(409, f"product {product!r} was changed by someone else meanwhile; "
                                         "nothing saved") from None
            except BuildError as exc:
                raise FeedbackError(422, f"product {product!r} rejected the change: {exc}") from exc
        except FeedbackError:
            await asyncio.to_thread(_remove, written)
            if not warning:
                await asyncio.to_thread(self._persist, before)
            raise

    def _persist(self, config: ProductConfig) -> str:
        """Save the product file; a failure is logged and returned (the change still serves, until a restart)."""
        try:
            self.registry.save_product_file(config)
        except OSError as exc:
            log.error("console feedback: product %s: its file could not be saved: %s", config.id, exc)
            return f"product file not saved: {exc}"
        return ""

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

    def _record(self, action: str, item: ReviewItem, fields: dict[str, Any], remote: str, *, files: list[Path],
                before: ProductConfig | None = None, after: ProductConfig | None = None,
                **extra: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex[:12], "at": time.time(), "action": action, "item": item.id, **fields,
            "files": [str(p) for p in files], "remote": remote, **extra,
        }
        if before is not None and after is not None:
            record["config_before"], record["config_after"] = _changed(before, after), _changed(after, before)
        return record

    async def _finish(self, record: dict[str, Any], item: ReviewItem) -> dict[str, Any]:
        await asyncio.to_thread(self._append, record)
        self._count(record["product"], record["action"])
        item.feedback = record
        log.info("console feedback %s: %s on %s/%r (score %.4f, threshold %.4f) from %s -> %s", record["id"],
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
        """Unique and readable, stamped with the time of the feedback (so later feedback sorts later)."""
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.3f}"[1:]
        # the suffix comes with the item (from Redis: whatever was written there); only an image suffix is a name
        suffix = item.original_suffix if item.original and item.original_suffix in ORIGINAL_SUFFIXES.values() \
            else ".png"
        return f"fb-{stamp}-{safe_file_name(str(item.result['frame_id']))[:60]}-{uuid.uuid4().hex[:6]}{suffix}"

    def _good_directory(self, config: ProductConfig, target: str, name: str) -> tuple[Path, list[Path]]:
        """Where a false alarm's image (file ``name``) goes, and the images copied there first. The console writes
        only under ``registry.references_root`` when it is set (as directories set over the admin API): a product
        whose directory lies elsewhere gets a new one there, seeded with copies of what it used, and switches to it
        (the operator's own folder is never written). Without ``references_root``, the product's own folder.

        A reference folder holding images the product leaves out (beyond ``shots``) that sort before ``name``
        cannot take the new image: raising ``shots`` over it would switch those on too. The product moves to a
        console-managed copy of the images it uses instead (refused without ``references_root``). Folders the
        console makes live under ``<references_root>/_console/``, where no product id leads (ids never start
        with ``_``), and a folder another product uses is never written."""
        key = "references" if target == "references" else "threshold.holdout_dir"
        current = config.references if target == "references" else config.threshold.holdout_dir
        root = self.registry.config.references_root
        used = _images(current, config.shots if target == "references" else 10**6)
        used_names = {p.name for p in used}
        if current and (root is None or Path(current).resolve().is_relative_to(Path(root).resolve())):
            skipped = _switched_on(Path(current), used_names, name) if target == "references" else []
            if not skipped:
                self._refuse_shared(config.id, Path(current), key)
                return Path(current), []
            managed = _managed_directory(root, target, config.id) if root is not None else None
            if managed is None or Path(current).resolve() == managed.resolve():
                raise FeedbackError(409, f"product {config.id!r} uses the first {config.shots} image(s) of "
                                         f"{current} by file name; the new reference would sort after "
                                         f"{len(skipped)} it leaves out ({', '.join(skipped[:5])}"
                                         f"{', ...' if len(skipped) > 5 else ''}), and raising shots would switch "
                                         "them on too: nothing saved (move those images out, or set "
                                         "registry.references_root so the console can use a copy)")
            directory = managed
        elif root is None:
            raise FeedbackError(409, f"product {config.id!r} has no {key} directory and registry.references_root "
                                     "is not set: nowhere to save the frame")
        elif target == "references" and current:
            directory = Path(root) / config.id  # where the admin API keeps this product's references
        else:
            directory = _managed_directory(root, target, config.id)
        self._refuse_shared(config.id, directory, key)
        stale = _switched_on(directory, used_names, name) if target == "references" else []
        if stale:
            raise FeedbackError(409, f"product {config.id!r}: the folder {directory} (where its references would be "
                                     f"copied) already holds images it does not use ({', '.join(stale[:5])}"
                                     f"{', ...' if len(stale) > 5 else ''}); nothing saved (empty it first)")
        seeded: list[Path] = []
        if used:
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

    def _refuse_shared(self, product: str, directory: Path, key: str) -> None:
        """409 when another product uses ``directory`` as its references or holdout (its images would change)."""
        resolved = directory.resolve()
        for other in self.registry.known_configs():
            if other.id == product:
                continue
            for other_key, value in (("references", other.references),
                                     ("threshold.holdout_dir", other.threshold.holdout_dir)):
                if value and Path(value).resolve() == resolved:
                    raise FeedbackError(409, f"product {product!r}: its {key} folder {directory} is the {other_key} "
                                             f"folder of product {other.id!r}; saving the frame there would change "
                                             "that product too: nothing saved")

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


SUMMARY_FIELDS = ("product", "line", "frame_id", "entry_id", "score", "threshold", "state_version")


def _summary_fields(item: ReviewItem) -> dict[str, Any]:
    """The item's fields its feedback record keeps; 422 when its summary lacks one, or its score or threshold is no
    finite number (an item from Redis carries whatever was written there: another version's, or a forged one)."""
    missing = [key for key in SUMMARY_FIELDS if key not in item.result]
    if missing:
        raise FeedbackError(422, f"the frame's summary lacks {', '.join(missing)}; nothing saved")
    for key in ("score", "threshold"):
        value = item.result[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FeedbackError(422, f"the frame's {key} {str(value)[:40]!r} is no number; nothing saved")
    return {key: item.result[key] for key in SUMMARY_FIELDS}


async def _write_all(files: list[tuple[Path, bytes]]) -> list[Path]:
    """Write each (path, bytes) and return the paths; one that cannot be written (a full disk, a file where a folder
    goes) removes those written before it: an answer that saved nothing leaves nothing (a retry never saves twice)."""
    written: list[Path] = []
    for path, data in files:
        try:
            written.append(await asyncio.to_thread(atomic.write_bytes, path, data))
        except OSError as exc:
            await asyncio.to_thread(_remove, written)
            raise FeedbackError(500, f"could not write {path} ({type(exc).__name__}: {exc}); nothing saved") from exc
    return written


def _managed_directory(root: str | Path, target: str, product: str) -> Path:
    """A folder the console makes for ``product``: ``<references_root>/_console/_<target>/<id>/``. No product id
    reaches it (ids never start with ``_``), nor does a product's eval folder when the feedback folder is the
    default ``<references_root>/_console`` (those are ``<id>/...``)."""
    return Path(root) / "_console" / f"_{target}" / product


def _switched_on(directory: Path, used: set[str], name: str) -> list[str]:
    """Images in ``directory`` a product using ``used`` (the first ``shots`` by name) leaves out that raising
    ``shots`` to take ``name`` would switch on: those sorting before the last of ``used`` and ``name``."""
    last = max(used | {name})
    return [p.name for p in _images(str(directory), 10**6) if p.name not in used and p.name != name and p.name < last]


def _images(directory: str | None, shots: int) -> list[Path]:
    """`reference_files`, empty for a folder that is missing or holds no image yet."""
    try:
        return reference_files(directory, shots)
    except BuildError:
        return []


def _image_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from an image's header (nothing decoded); 422 for bytes that are no image, or one over
    ``max_pixels`` (None: Pillow's decompression-bomb bound)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FeedbackError(422, f"the frame's saved image cannot be read ({type(exc).__name__}); nothing saved") \
            from exc
    if width * height > (max_pixels or 2 * (Image.MAX_IMAGE_PIXELS or 2**30)):
        raise FeedbackError(422, f"the frame's saved image is {width}x{height}, too large for a mask; nothing saved")
    return width, height


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


def _get(config: ProductConfig, key: str) -> Any:
    return config.threshold.holdout_dir if key == "threshold.holdout_dir" else getattr(config, key)


def _set(config: ProductConfig, key: str, value: Any) -> None:
    if key == "threshold.holdout_dir":
        config.threshold.holdout_dir = value
    else:
        setattr(config, key, value)


def _same_feedback_fields(a: ProductConfig, b: ProductConfig) -> bool:
    return (a.references, a.shots, a.threshold.holdout_dir) == (b.references, b.shots, b.threshold.holdout_dir)


def _revert(config: ProductConfig, before: dict[str, Any], after: dict[str, Any],
            in_use: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Put back what an action changed where the config still says what the action set; ``shots`` goes down by
    what the action added. A folder in ``in_use`` (later feedback saved there) stays. Returns the keys left as they
    are (changed by someone since, or still in use)."""
    kept = []
    for key, old in before.items():
        if key == "shots":
            config.shots = max(0, config.shots - (after[key] - old))
        elif _get(config, key) == after.get(key) and str(after.get(key)) not in in_use:
            _set(config, key, old)
        else:
            kept.append(key)
    return kept


def _inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refused unless it stays inside ``root``."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise FeedbackError(400, f"{'/'.join(parts)!r} leaves the feedback folder")
    return path


def _set_aside(paths: list[Path]) -> list[tuple[Path, Path]]:
    """Rename each existing file to a hidden name beside it; (hidden, original) pairs for `_restore`."""
    out = []
    for path in paths:
        if path.exists():
            hidden = path.parent / f".undo-{uuid.uuid4().hex}.tmp"
            path.replace(hidden)
            out.append((hidden, path))
    return out


def _restore(pairs: list[tuple[Path, Path]]) -> None:
    for hidden, path in pairs:
        hidden.replace(path)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"
