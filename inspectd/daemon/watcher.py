"""File watcher: product YAML files in registry.products_dir and every product's reference/holdout directory.

Bursts are debounced (registry.debounce_s of quiet), temp/half-written files ignored, sizes must settle;
then a changed product file -> registry.put, a deleted one -> remove, a changed reference dir -> reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from inspectd.daemon.config import ConfigError, DaemonConfig, ProductConfig, load_product_file
from inspectd.daemon.products import PRODUCT_SUFFIXES, duplicate_error, load_product_dir, product_files
from inspectd.daemon.registry import FAILED, BuildError, ProductRegistry

log = logging.getLogger(__name__)

TEMP_SUFFIXES = (".tmp", ".part", ".crdownload", ".swp")
CATCH_UP_S = 1.0  # after start: the folders are watched by then; what changed before is compared and applied
RESYNC_S = 1.0  # how often the set of watched directories is compared with the registry's
SETTLE_STEP_S = 0.1
SETTLE_MAX_S = 10.0


def ignored(name: str) -> bool:
    """Hidden, temporary or half-written files: editors' swap files, partial downloads, our own temp files."""
    return name.startswith(".") or name.endswith("~") or name.lower().endswith(TEMP_SUFFIXES)


def watch_filter(change: Change, path: str) -> bool:
    return not ignored(Path(path).name)


def _sizes(paths: list[Path]) -> dict[Path, int]:
    out = {}
    for path in paths:
        try:
            out[path] = path.stat().st_size
        except OSError:
            out[path] = -1
    return out


async def wait_settled(directory: Path, step: float = SETTLE_STEP_S, limit: float = SETTLE_MAX_S) -> bool:
    """Until two looks ``step`` apart see the same non-ignored files with the same sizes (bounded)."""
    deadline = time.monotonic() + limit

    def look() -> dict[Path, int]:
        if not directory.is_dir():
            return {}
        return _sizes([p for p in directory.iterdir() if not ignored(p.name)])

    before = await asyncio.to_thread(look)
    while time.monotonic() < deadline:
        await asyncio.sleep(step)
        after = await asyncio.to_thread(look)
        if after == before:
            return True
        before = after
    log.warning("watcher: %s still changing after %.0fs; using it as it is", directory, limit)
    return False


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _listing(directory: Path) -> tuple[tuple[str, tuple[int, int] | None], ...] | None:
    """A folder's files with their (mtime, size); None when it cannot be listed."""
    try:
        return tuple(sorted((p.name, _stat(p)) for p in directory.iterdir() if not ignored(p.name)))
    except OSError:
        return None


class RegistryWatcher:
    """Watches products_dir and reference directories; applies changes to the registry off the hot path."""

    def __init__(self, registry: ProductRegistry, config: DaemonConfig) -> None:
        self.registry = registry
        self.config = config
        self.debounce_s = max(0.05, config.registry.debounce_s)
        self.products_dir = Path(config.registry.products_dir).resolve() if config.registry.products_dir else None
        self._file_ids: dict[Path, str] = {}  # product file -> the product id it defined
        self._task: asyncio.Task | None = None
        self._side: set[asyncio.Task] = set()  # rebuilds of failed products whose folder appeared
        self._stop = asyncio.Event()
        self.rebuilds = 0  # actions taken, for tests
        self.errors = 0

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def snapshot(config: DaemonConfig) -> dict[Path, Any]:
        """What the products were built from, taken before they are: each product file's (mtime, size) and each
        reference folder's listing. `start` compares it with the folders once it watches them, so a change made
        while the products built (minutes, for a training detector) is applied, not missed."""
        products_dir = config.registry.products_dir
        folder = load_product_dir(products_dir)
        ids = {path.resolve(): product_id for product_id, (path, _) in folder.defined.items()}
        state: dict[Path, Any] = {path.resolve(): (_stat(path), ids.get(path.resolve()))
                                  for path in product_files(products_dir)}
        for product in [*config.products, *(c for _, c in folder.defined.values())]:
            for directory in (product.references, product.threshold.holdout_dir):
                if directory:
                    state[Path(directory).resolve()] = _listing(Path(directory))
        return state

    def start(self, since: dict[Path, Any] | None = None) -> None:
        """Watch from now; with ``since`` (a `snapshot` taken before the products were built), also apply what
        changed since then."""
        for path in product_files(str(self.products_dir) if self.products_dir else None):
            with contextlib.suppress(ConfigError, OSError):
                self._file_ids[path.resolve()] = load_product_file(path).id
        self._task = asyncio.create_task(self._run(), name="watcher")
        if since is not None:
            task = asyncio.create_task(self._catch_up(since), name="watcher-catch-up")
            self._side.add(task)
            task.add_done_callback(self._side.discard)

    async def _catch_up(self, since: dict[Path, Any]) -> None:
        """Once the folders are watched (changes from then on raise events), apply what changed before."""
        await asyncio.sleep(CATCH_UP_S)
        now = await asyncio.to_thread(self.snapshot, self.config)
        for path in sorted(p for p in set(since) | set(now) if p.suffix in PRODUCT_SUFFIXES
                           and self.products_dir is not None and p.parent == self.products_dir):
            if since.get(path) != now.get(path):
                log.info("watcher: %s changed while the products were built", path.name)
                if path not in now and path in since and since[path][1]:
                    self._file_ids.setdefault(path, since[path][1])  # what it defined when the products were built
                await self._product_file_changed(path, deleted=path not in now)
        by_dir = self.reference_dirs()
        for directory in sorted(d for d in by_dir if d in since and since[d] != _listing(d)):
            for product_id in sorted(by_dir[directory]):
                await self._rebuild(directory, product_id, "changed while the products were built")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._side):
            task.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)

    # ------------------------------------------------------------------ what to watch
    def reference_dirs(self) -> dict[Path, set[str]]:
        """Folder -> the products built from it: every serving product's, and those of the newest config asked
        for (one still building, or one whose build failed with nothing serving, e.g. its folder was empty)."""
        dirs: dict[Path, set[str]] = {}
        for config in self.registry.known_configs():
            for directory in (config.references, config.threshold.holdout_dir):
                if directory:
                    dirs.setdefault(Path(directory).resolve(), set()).add(config.id)
        return dirs

    def watched(self) -> frozenset[Path]:
        paths = {d for d in self.reference_dirs() if d.is_dir()}
        if self.products_dir is not None and self.products_dir.is_dir():
            paths.add(self.products_dir)
        return frozenset(paths)

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        previous: frozenset[Path] | None = None
        while not self._stop.is_set():
            paths = self.watched()
            if previous is not None:
                self._appeared(paths - previous)
            previous = paths
            if not paths:
                await asyncio.sleep(RESYNC_S)
                continue
            restart = asyncio.Event()
            resync = asyncio.create_task(self._resync(paths, restart))
            try:
                # step = the quiet period that ends a burst; debounce = the longest a burst is held
                async for changes in awatch(*paths, watch_filter=watch_filter, stop_event=restart,
                                            step=int(self.debounce_s * 1000), debounce=int(self.debounce_s * 10000),
                                            recursive=False, rust_timeout=500, yield_on_timeout=False):
                    await self.apply(changes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a watcher hiccup must not stop the daemon
                self.errors += 1
                log.warning("watcher: %s; restarting in %.0fs", exc, RESYNC_S)
                await asyncio.sleep(RESYNC_S)
            finally:
                resync.cancel()

    def _appeared(self, directories: frozenset[Path]) -> None:
        """A failed product's folder that did not exist (its build failed on that) and now does: build it from
        what is already inside (files copied in before awatch watched the folder raise no event)."""
        by_dir = self.reference_dirs()
        for directory in sorted(directories):
            for product_id in sorted(by_dir.get(directory, ())):
                if self.registry.get(product_id) is None and self.registry.status(product_id) == FAILED:
                    task = asyncio.create_task(self._rebuild(directory, product_id, "appeared"))
                    self._side.add(task)
                    task.add_done_callback(self._side.discard)

    async def _rebuild(self, directory: Path, product_id: str, what: str) -> None:
        await wait_settled(directory)
        await self._act(f"reference directory {directory} {what}", self.registry.reload(product_id, force=False))

    async def _resync(self, paths: frozenset[Path], restart: asyncio.Event) -> None:
        """Restart awatch when a product's reference directory appears, moves or goes away."""
        while not self._stop.is_set():
            await asyncio.sleep(RESYNC_S)
            if self.watched() != paths:
                restart.set()
                return
        restart.set()

    async def apply(self, changes: set[tuple[Change, str]]) -> None:
        """One debounced burst: product files first, then each touched reference directory once."""
        files: dict[Path, Change] = {}
        dirs: set[Path] = set()
        for change, raw in changes:
            path = Path(raw)
            parent = path.parent.resolve()
            if self.products_dir is not None and parent == self.products_dir and path.suffix in PRODUCT_SUFFIXES:
                files[path.resolve()] = change
            else:
                dirs.add(parent)
        for path, change in sorted(files.items()):
            await self._product_file_changed(path, deleted=change == Change.deleted and not path.exists())
        by_dir = self.reference_dirs()
        for directory in sorted(dirs):
            for product_id in sorted(by_dir.get(directory, ())):
                await self._rebuild(directory, product_id, "changed")

    async def _product_file_changed(self, path: Path, deleted: bool) -> None:
        previous = self._file_ids.get(path)
        if deleted:
            self._file_ids.pop(path, None)
            if previous is None or self.registry.status(previous) is None:
                return  # unknown, or already removed (e.g. DELETE via the API)
            defined = (await asyncio.to_thread(load_product_dir, str(self.products_dir))).defined
            if previous in defined:  # another file defines it (one that was rejected as its duplicate): that one now
                other, config = defined[previous]
                await self._act(f"{path.name} deleted; {other.name} defines {previous}",
                                self.registry.put(config, force=False))
                return
            inline = next((p for p in self.config.products if p.id == previous), None)
            if inline is not None:
                await self._act(f"{path.name} deleted; back to the inline definition", self.registry.put(inline,
                                                                                                         force=False))
            else:
                log.info("watcher: %s deleted; removing product %s", path.name, previous)
                await self.registry.remove(previous)
                self.rebuilds += 1
            return
        await wait_settled(path.parent)
        try:
            config: ProductConfig = await asyncio.to_thread(load_product_file, path)
            defined = (await asyncio.to_thread(load_product_dir, str(self.products_dir))).defined
            definer = defined.get(config.id, (path, config))[0]
        except (ConfigError, OSError) as exc:
            self.errors += 1
            log.error("watcher: product file %s rejected: %s (the serving version stays)", path.name, exc)
            self.registry.record_invalid(previous or path.stem, f"{path.name}: {exc}")
            return
        if definer.resolve() != path.resolve():  # the rule a start applies (products.load_product_dir)
            self.errors += 1
            log.error("watcher: product file %s rejected: %s", path.name, duplicate_error(config.id, definer))
            if previous is not None and previous != config.id:  # what it defined before keeps serving, with this
                self.registry.record_invalid(previous, f"{path.name}: now repeats product {config.id!r} of "
                                                       f"{definer.name}")
            return
        self._file_ids[path] = config.id
        if previous is not None and previous != config.id and previous not in self._file_ids.values():
            log.info("watcher: %s now defines %s instead of %s; removing %s", path.name, config.id, previous,
                     previous)
            await self.registry.remove(previous)
        await self._act(f"{path.name} changed", self.registry.put(config, force=False))

    async def _act(self, why: str, build: Any) -> None:
        try:
            before = self.registry.builds
            entry = await build
            if self.registry.builds != before:
                self.rebuilds += 1
                log.info("watcher: %s -> product %s version %d", why, entry.id, entry.version)
        except (BuildError, KeyError) as exc:
            self.errors += 1
            log.error("watcher: %s, but the rebuild was rejected: %s (the serving version stays)", why, exc)
