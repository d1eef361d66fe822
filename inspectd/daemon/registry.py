"""Product registry: product id -> (detector, ProductState, version, threshold), rebuilt off the hot path.

The registry owns status, versions, locks, the swap and persistence; the science of a build (fit +
calibrate, the state cache) is `detectors.building`. Builds run in a bounded pool of worker threads
(one slow product never blocks the others' rebuilds) while the engine keeps scoring with the old
entry; the new entry replaces the old one in one assignment, so a batch sees either the old or the
new version, never a mix. Each build has a `FitContext`: its progress is visible (`progress`), and a
newer update of the same product stops the superseded build. A failed or stopped build leaves the
old entry serving and never touches a good cached result.

A ``force=False`` update (the file watcher, which also sees the daemon's own writes) stops nothing until it is
known to be a real change: one equal to the build in progress waits for that build, one equal to the serving
config while a newer one builds is a stale echo, and a folder reload whose files read the same as the running
build's is no change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspectd import atomic
from inspectd.daemon.config import ProductConfig, RegistryConfig, ThresholdConfig
from inspectd.detectors import cpu_threads
from inspectd.detectors.artifacts import file_hash
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import Detector, ProductSpec, ProductState, create_detector
from inspectd.detectors.building import (
    BuildError,
    StateCache,
    ThresholdPolicy,
    build_fingerprint,
    build_product,
)
from inspectd.detectors.context import FitContext, FitStopped
from inspectd.streams.codec import decode_image_bytes
from inspectd.streams.folder import IMAGE_SUFFIXES
from inspectd.streams.records import MaskPolicy

log = logging.getLogger(__name__)


PRODUCT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # ids the API accepts (and may become paths)

READY = "ready"
BUILDING = "building"
FAILED = "failed"

__all__ = ["BUILDING", "FAILED", "IMAGE_SUFFIXES", "PRODUCT_ID_RE", "READY", "BuildError", "BuildSuperseded",
           "ProductEntry", "ProductRegistry"]


class BuildSuperseded(BuildError):
    """A build stopped because a newer update of the same product arrived (that one builds instead)."""


@dataclass(frozen=True)
class ProductEntry:
    """Everything the engine needs to score one product's frames; replaced whole, never mutated."""

    config: ProductConfig
    detector: Detector
    state: ProductState
    version: int
    threshold: float
    fingerprint: str
    built_at: float
    calibration: dict
    mask_policy: MaskPolicy  # parsed from config.mask once, at build time
    references: tuple[str, ...] = ()  # file names of the references this version was built from
    model: str = "default"

    @property
    def id(self) -> str:
        return self.config.id

    def describe(self) -> dict:
        learning = self.detector.learning
        return {
            "id": self.id, "version": self.version, "detector": self.config.detector,
            "detector_version": self.detector.version, "model": self.model,
            "learning": {"per_product": learning.per_product,
                         "offline": learning.offline.__name__ if learning.offline else None},
            "threshold": self.threshold, "fingerprint": self.fingerprint, "built_at": self.built_at,
            "shots": self.state.meta.get("shots", len(self.references)), "references": list(self.references),
            "calibration": self.calibration, "config": asdict(self.config),
        }


@dataclass
class BuildProgress:
    """A build in progress (or queued): what it builds, what it is at, how to stop it, and how it ended."""

    ctx: FitContext
    config: ProductConfig | None = None
    started_at: float = field(default_factory=time.time)
    fraction: float = 0.0
    note: str = "queued"
    inputs: str | None = None  # fingerprint of the reference/holdout files it read (None until read)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    entry: ProductEntry | None = None  # set when it ended with an entry (new or unchanged)
    error: BaseException | None = None  # set when it ended with an exception

    def describe(self) -> dict[str, Any]:
        return {"fraction": round(self.fraction, 4), "note": self.note, "started_at": self.started_at,
                "elapsed_s": round(time.time() - self.started_at, 3)}


def reference_files(directory: str | None, shots: int) -> list[Path]:
    if shots <= 0 or not directory:
        return []
    root = Path(directory)
    if not root.is_dir():
        raise BuildError(f"reference directory {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise BuildError(f"reference directory {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:shots]


def decode_reference(data: bytes) -> np.ndarray:
    """Decode one reference (or holdout) image exactly as a build does (the admin API checks uploads with it)."""
    return decode_image_bytes(data)


def inputs_fingerprint(files: list[Path], holdout: list[Path]) -> str:
    """Hash of the names and contents of the files a build reads: equal means a rebuild would read the same."""
    digest = hashlib.sha256()
    for kind, paths in (("references", files), ("holdout", holdout)):
        digest.update(kind.encode())
        for path in paths:
            digest.update(path.name.encode() + b"\0" + file_hash(path).encode())
    return digest.hexdigest()[:20]


def config_inputs(config: ProductConfig) -> str | None:
    """`inputs_fingerprint` of the files ``config`` would build from now; None when they cannot be listed."""
    try:
        files = reference_files(config.references, config.shots)
        holdout = reference_files(config.threshold.holdout_dir, 10**6) if config.threshold.holdout_dir else []
        return inputs_fingerprint(files, holdout)
    except (BuildError, OSError):
        return None


def load_images(files: list[Path]) -> list[np.ndarray]:
    images = []
    for path in files:
        try:
            images.append(decode_reference(path.read_bytes()))
        except Exception as exc:  # noqa: BLE001 - FrameError and OS errors alike
            raise BuildError(f"reference image {path.name} cannot be read: {exc}") from exc
    return images


def check_tiles(detector: Detector, files: list[Path], images: list[np.ndarray], max_tiles: int) -> None:
    """A build image (reference or holdout) that needs more model inputs than ``max_tiles`` (decode.max_tiles, as
    for a frame) is refused by name before anything is resized: a 1 x 10000 strip would be ~12,500 inputs."""
    for path, image in zip(files, images, strict=True):
        height, width = image.shape[:2]
        needed = detector.preprocessor.layout(height, width).n_tiles
        if needed > max_tiles:
            raise BuildError(f"image {path} ({width}x{height}) needs {needed} inputs of {detector.preprocessor.size} "
                             f"px > decode.max_tiles {max_tiles}: crop it to the part's aspect ratio")


def threshold_policy(config: ThresholdConfig) -> ThresholdPolicy:
    return ThresholdPolicy(value=config.value, quantile=config.quantile, margin=config.margin, default=config.default)


class ProductRegistry:
    """The live product table. Reads (`get`) are lock-free; builds are serialised per product."""

    def __init__(self, backbones: ClipBackbone | Mapping[str, ClipBackbone], config: RegistryConfig,
                 on_change: Callable[[ProductEntry | None, str], None] | None = None,
                 on_remove: Callable[[str], None] | None = None,
                 on_progress: Callable[[str, float | None], None] | None = None, max_tiles: int = 16) -> None:
        self.max_tiles = max_tiles  # decode.max_tiles: the most model inputs a build image may need, as a frame
        # the model pool: name -> loaded backbone; a product's `model` picks one (default: the first)
        self.backbones: dict[str, ClipBackbone] = (dict(backbones) if isinstance(backbones, Mapping)
                                                   else {"default": backbones})
        if not self.backbones:
            raise ValueError("the registry needs at least one model")
        self.backbone = next(iter(self.backbones.values()))
        self.config = config
        self._entries: dict[str, ProductEntry] = {}
        self._status: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready_events: dict[str, asyncio.Event] = {}
        self._builds: dict[str, BuildProgress] = {}  # product -> the build running for it
        self._latest: dict[str, BuildProgress] = {}  # product -> the newest build asked for (running or queued)
        # product -> the newest config asked for (what reload rebuilds): the serving one once a build ends, except
        # for a product that never served, whose failed config stays (its folders are watched, reload retries it)
        self._wanted: dict[str, ProductConfig] = {}
        self._version_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max(1, config.build_workers),
                                            thread_name_prefix="inspectd-build")
        self._on_change = on_change  # (entry, id) on a swap; (None, id) on a rejected build
        self._on_remove = on_remove  # (id) on removal; without it removal is signalled as on_change(None, id)
        self._on_progress = on_progress  # (id, fraction) while building; (id, None) when the build ends
        self.builds = 0  # completed builds (swaps), for tests and the admin API
        self.cache = StateCache(config.state_cache_dir) if config.state_cache_dir else None
        self.cache_dir = self.cache.dir if self.cache else None

    def backbone_for(self, model: str | None) -> tuple[str, ClipBackbone]:
        name = model or next(iter(self.backbones))
        if name not in self.backbones:
            raise BuildError(f"model {name!r} is not loaded; models: {sorted(self.backbones)}")
        return name, self.backbones[name]

    # ---------------------------------------------------------------- reads (hot path)
    def get(self, product_id: str) -> ProductEntry | None:
        return self._entries.get(product_id)

    def status(self, product_id: str) -> str | None:
        return self._status.get(product_id)

    def error(self, product_id: str) -> str | None:
        return self._errors.get(product_id)

    def record_invalid(self, product_id: str, error: str) -> None:
        """A product definition that cannot even be parsed (a broken YAML file): shown as ``failed`` with the
        error in the API, counted as a rejected build, and not ready; a version already serving keeps serving."""
        log.error("product %s: definition rejected: %s", product_id, error)
        self._errors[product_id] = error
        self._status[product_id] = READY if product_id in self._entries else FAILED
        if self._on_change:
            self._on_change(None, product_id)

    def progress(self, product_id: str) -> dict[str, Any] | None:
        """The running build's progress (fraction, note, timing), or None when none runs."""
        build = self._builds.get(product_id)
        return build.describe() if build else None

    def ids(self) -> list[str]:
        return sorted(set(self._entries) | set(self._status))

    def all_ready(self) -> bool:
        """Every known product serves (a failed one, e.g. a broken product file, makes the daemon not ready)."""
        return all(s == READY for s in self._status.values()) if self._status else True

    async def wait_ready(self, product_id: str, timeout: float) -> ProductEntry | None:
        """The entry once ``product_id`` serves; None at once when its first build failed, was stopped or the
        product was removed (nothing to wait for), or after ``timeout``."""
        event = self._ready_events.setdefault(product_id, asyncio.Event())
        if product_id in self._entries:
            return self._entries[product_id]
        if self._status.get(product_id) != BUILDING:
            return None
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
        return self._entries.get(product_id)

    # ---------------------------------------------------------------- writes (off the hot path)
    async def put(self, config: ProductConfig, force: bool = True) -> ProductEntry:
        """Build ``config`` and swap it in; raises BuildError (old entry keeps serving).

        A build of the same product still running is stopped first (BuildSuperseded for its caller).
        With ``force=False`` (file watcher, uploads) nothing is stopped until the request is known to change
        something (see `_unchanged`), and a build whose config and reference fingerprint equal the serving entry's
        is skipped and the serving entry returned, so echoes of our own writes cost no new version.
        """
        if not force:
            unchanged = await self._unchanged(config)
            if unchanged is not None:
                return unchanged
        self._stop_builds(config.id, "a newer update arrived")
        self._wanted[config.id] = config
        build = BuildProgress(FitContext(seed=config.seed,
                                         on_progress=lambda f, note: self._progressed(config.id, f, note)),
                              config=config)
        self._latest[config.id] = build
        try:
            build.entry = await self._put(config, build, force)
            return build.entry
        except BaseException as exc:
            build.error = exc
            raise
        finally:
            build.finished.set()  # wakes the echoes waiting for this build

    async def _unchanged(self, config: ProductConfig) -> ProductEntry | None:
        """For a ``force=False`` request: the entry to answer with when it changes nothing, else None (build it).

        - equal to the build in progress (or queued), whose files read the same now: wait for that build;
        - equal to the serving config while another config builds: a stale echo (e.g. the watcher seeing the
          product file of the previous PUT), answered with the serving entry; the wanted state is left alone.
        """
        product_id = config.id
        for _ in range(100):  # re-checked after each wait: another update may have come meanwhile
            pending = self._latest.get(product_id)
            serving = self._entries.get(product_id)
            wanted = self._wanted.get(product_id)
            if pending is not None and pending.config == config and not pending.ctx.should_stop():
                while (pending.inputs is None and not pending.finished.is_set()
                       and self._builds.get(product_id) is pending):
                    await asyncio.sleep(0.02)  # running, about to read its files: compare with what it read
                if pending.inputs is not None:  # (None: still queued, so it reads the folder as it is now)
                    now = await asyncio.to_thread(config_inputs, config)
                    if self._latest.get(product_id) is not pending:
                        continue  # it ended (or a newer one came) meanwhile: look again
                    if now != pending.inputs:
                        return None  # the folder changed since that build read it: a real change
                await pending.finished.wait()
                if isinstance(pending.error, BuildError):
                    raise type(pending.error)(str(pending.error))
                if pending.entry is not None:
                    log.info("product %s: same as the build in progress; version %d serves it", product_id,
                             pending.entry.version)
                    return pending.entry
                continue  # it ended otherwise (cancelled): look again
            if serving is not None and config == serving.config and wanted is not None and wanted != config:
                log.info("product %s: update equal to the serving version %d while a newer config builds "
                         "(a stale echo); ignored", product_id, serving.version)
                return serving
            return None
        return None

    async def _put(self, config: ProductConfig, build: BuildProgress, force: bool) -> ProductEntry:
        lock = self._locks.setdefault(config.id, asyncio.Lock())
        async with lock:
            if build.ctx.should_stop():  # an even newer update stopped us while we waited
                self._forget(config.id, build)
                raise BuildSuperseded(f"product {config.id!r}: superseded by a newer update before it started")
            self._builds[config.id] = build
            if config.id not in self._entries:
                self._status[config.id] = BUILDING
            current = None if force else self._entries.get(config.id)
            try:
                loop = asyncio.get_running_loop()
                entry = await loop.run_in_executor(self._executor, cpu_threads.released_team(self._build), config,
                                                   current, build)  # (its OpenMP team freed after)
            except FitStopped as exc:
                log.info("product %s: build stopped (superseded); version %s keeps serving", config.id,
                         self._entries[config.id].version if config.id in self._entries else "none")
                if config.id not in self._entries and self._latest.get(config.id) is build:
                    self._status[config.id] = FAILED  # stopped with nothing newer coming (a removal)
                    self._release_waiters(config.id)
                raise BuildSuperseded(f"product {config.id!r}: build stopped by a newer update") from exc
            except Exception as exc:
                message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                log.error("product %s: build rejected: %s", config.id, message)
                serving = self._entries.get(config.id)
                if self._wanted.get(config.id) is config and serving is not None:
                    self._wanted[config.id] = serving.config  # rejected: a reload rebuilds what serves
                # (with nothing serving the rejected config stays wanted: a reload or a change in its folders
                # retries it)
                self._errors[config.id] = message
                newer = self._latest.get(config.id) not in (None, build)
                if serving is not None:
                    self._status[config.id] = READY
                elif not newer:  # nothing serves and nothing newer comes: parked frames are dead-lettered now
                    self._status[config.id] = FAILED
                    self._release_waiters(config.id)
                if self._on_change:
                    self._on_change(None, config.id)
                raise BuildError(message) from exc
            finally:
                self._forget(config.id, build)
            if entry is current:
                log.info("product %s: unchanged (fingerprint %s); version %d keeps serving", config.id,
                         entry.fingerprint, entry.version)
                return entry
            self._entries[config.id] = entry  # the atomic swap
            self._status[config.id] = READY
            self._errors.pop(config.id, None)
            self.builds += 1
            self._ready_events.setdefault(config.id, asyncio.Event()).set()
            log.info("product %s: version %d ready (threshold %.4f, %s)", config.id, entry.version,
                     entry.threshold, entry.calibration.get("method"))
            if self._on_change:
                self._on_change(entry, config.id)
            return entry

    def _release_waiters(self, product_id: str) -> None:
        """Wake the frames parked for ``product_id``'s first build (it will not come); a later build waits anew."""
        event = self._ready_events.pop(product_id, None)
        if event is not None:
            event.set()

    def _stop_builds(self, product_id: str, why: str) -> None:
        """Stop the running build and any queued one of ``product_id`` (they are superseded)."""
        for build in {id(b): b for b in (self._builds.get(product_id), self._latest.get(product_id)) if b}.values():
            if not build.ctx.should_stop():
                log.info("product %s: %s; stopping the superseded build", product_id, why)
                build.ctx.stop()

    def _forget(self, product_id: str, build: BuildProgress) -> None:
        if self._latest.get(product_id) is build:
            del self._latest[product_id]
        if self._builds.get(product_id) is build:
            del self._builds[product_id]
            if self._on_progress:
                self._on_progress(product_id, None)

    def _progressed(self, product_id: str, fraction: float, note: str) -> None:
        """Called from a build thread: record progress, tell the metric, log at every quarter."""
        build = self._builds.get(product_id)
        if build is None:
            return
        before = build.fraction
        build.fraction, build.note = fraction, note
        if self._on_progress:
            self._on_progress(product_id, fraction)
        if int(fraction * 4) > int(before * 4):
            log.info("product %s: build %d%% (%s)", product_id, round(fraction * 100), note)

    async def reload(self, product_id: str, force: bool = True) -> ProductEntry:
        """Rebuild from the newest config asked for (the serving one, one still building: a reload that stops a
        build never drops its config change, or the failed one of a product that never served), references
        re-read; KeyError for a product neither serving nor asked for."""
        entry = self._entries.get(product_id)
        config = self._wanted.get(product_id) or (entry.config if entry else None)
        if config is None:
            raise KeyError(product_id)
        return await self.put(config, force=force)

    def wanted(self, product_id: str) -> ProductConfig | None:
        """The newest config asked for (maybe still building, or failed with nothing serving), None for a
        product never put (or removed)."""
        return self._wanted.get(product_id)

    async def settled(self, product_id: str, timeout: float = 600.0) -> ProductEntry | None:
        """The serving entry once no build of ``product_id`` is running or queued (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while (product_id in self._latest or product_id in self._builds) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._entries.get(product_id)

    async def remove(self, product_id: str) -> bool:
        """Stop serving ``product_id`` (stops a build in progress first); False if it was unknown."""
        self._stop_builds(product_id, "the product is being removed")
        self._wanted.pop(product_id, None)
        lock = self._locks.setdefault(product_id, asyncio.Lock())
        async with lock:
            found = self._entries.pop(product_id, None) is not None
            known = self._status.pop(product_id, None) is not None or found
            self._errors.pop(product_id, None)
            self._release_waiters(product_id)  # parked frames go now (dead-lettered unknown_product)
        if not known:
            return False
        log.info("product %s: removed", product_id)
        if self._on_remove:
            self._on_remove(product_id)
        elif self._on_change:
            self._on_change(None, product_id)
        return True

    def configs(self) -> list[ProductConfig]:
        return [entry.config for entry in self._entries.values()]

    def known_configs(self) -> list[ProductConfig]:
        """Every config whose folders matter: the serving ones, and the newest asked for (building, or failed
        with nothing serving: images arriving in its empty reference folder must build it)."""
        out = self.configs()
        out += [c for c in self._wanted.values() if c not in out]
        return out

    # ---------------------------------------------------------------- product files (persistence)
    def product_file(self, product_id: str) -> Path | None:
        """The YAML file in products_dir defining ``product_id`` (as a start reads the folder:
        `products.load_product_dir`), else a name for a new one: ``<id>.yaml``, unless that file defines another
        product (then ``<id>-N.yaml``); a file refused as broken or as a duplicate may be written over. None without
        a products_dir."""
        if not self.config.products_dir:
            return None
        from inspectd.daemon.products import PRODUCT_SUFFIXES, load_product_dir

        root = Path(self.config.products_dir)
        folder = load_product_dir(str(root))
        if product_id in folder.defined:
            return folder.defined[product_id][0]
        others = {path for path, _ in folder.defined.values()}  # (none of them defines product_id)
        for n in range(1000):
            names = [f"{product_id}{suffix}" for suffix in PRODUCT_SUFFIXES] if n == 0 else [f"{product_id}-{n}.yaml"]
            if not any(root / name in others for name in names):  # (a file made since the listing: ours, saved by a
                #                                                  concurrent save of this product)
                return next((root / name for name in names if (root / name).exists()), root / names[0])
        raise BuildError(f"product {product_id!r}: no free product file name in {root}")

    def save_product_file(self, config: ProductConfig) -> Path | None:
        """Persist ``config`` as YAML into products_dir (atomic rename; dot-prefixed temp file)."""
        path = self.product_file(config.id)
        if path is None:
            return None
        import yaml

        return atomic.write_text(path, yaml.safe_dump(asdict(config), sort_keys=False))

    def delete_product_file(self, product_id: str) -> Path | None:
        path = self.product_file(product_id)
        if path is None or not path.exists():
            return None
        path.unlink(missing_ok=True)
        return path

    def close(self) -> None:
        """Stop every build (a training fit ends at its next step instead of holding the process's exit until it
        is done) and the build threads."""
        for product_id in sorted(set(self._builds) | set(self._latest)):
            self._stop_builds(product_id, "the daemon is stopping")
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- building
    def _build(self, config: ProductConfig, current: ProductEntry | None, build: BuildProgress) -> ProductEntry:
        started = time.perf_counter()
        ctx = build.ctx
        try:
            model, backbone = self.backbone_for(config.model)
            detector = create_detector(config.detector, backbone, config.options)
            detector.max_reference_tiles = self.max_tiles
            detector.load_learned()
            mask_policy = MaskPolicy.parse(config.mask)
            policy = threshold_policy(config.threshold)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        files = reference_files(config.references, config.shots)
        if config.shots > 0 and not config.references:
            log.warning("product %s: shots is %d but no `references` folder is set: it runs zero-shot%s", config.id,
                        config.shots, "" if config.threshold.value is not None or config.threshold.holdout_dir
                        else f", with the uncalibrated default threshold {config.threshold.default}")
        holdout_files = reference_files(config.threshold.holdout_dir, 10**6) if config.threshold.holdout_dir else []
        build.inputs = inputs_fingerprint(files, holdout_files)  # what an echo compares its folder with
        spec = ProductSpec(config.id, config.object_name, tuple(config.defect_words))
        fingerprint = build_fingerprint(detector, spec, policy, files, holdout_files, extra={"seed": config.seed})
        if current is not None and current.fingerprint == fingerprint and current.config == config:
            return current
        result = self.cache.load(detector, config.id, fingerprint) if self.cache else None
        if result is None:
            if self.cache and detector.learning.per_product == "trained":
                ctx.checkpoint_dir = self.cache.checkpoint_dir(config.id, fingerprint)
            references, holdout = load_images(files), load_images(holdout_files)
            check_tiles(detector, [*files, *holdout_files], [*references, *holdout], self.max_tiles)
            result = build_product(detector, spec, references, holdout, policy, ctx)
            result.fingerprint = fingerprint
            if self.cache:
                self.cache.store(detector, config.id, result)
                if ctx.checkpoint_dir is not None:
                    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # the saved state replaces the checkpoints
        threshold = result.threshold if config.threshold.value is None else config.threshold.value
        with self._version_lock:
            version = self._versions.get(config.id, 0) + 1
            self._versions[config.id] = version
        log.info("product %s: built in %.2fs", config.id, time.perf_counter() - started)
        return ProductEntry(config, detector, result.state.to(backbone.device), version, threshold, fingerprint,
                            time.time(), dict(result.calibration), mask_policy, tuple(p.name for p in files), model)


