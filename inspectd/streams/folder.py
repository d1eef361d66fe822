"""Watched-folder frame source: polls a directory for new image files, emits a file once its size and
mtime held still across two scans, and on ack moves it to ``done/`` (or records it in a ledger)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from stat import S_ISREG

from inspectd.streams.reasons import Reason
from inspectd.streams.schema import AckHandle, DeadLetter, Frame
from inspectd.streams.text import safe_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
log = logging.getLogger(__name__)
AFTER_MOVE = "move"
AFTER_RECORD = "record"
LEDGER_NAME = ".inspectd-processed.jsonl"
WATCH_RESTART_MAX_S = 30.0  # the longest wait before the change notification is restarted after a failure

Item = Frame | DeadLetter
Stat = tuple[int, int]  # (size, mtime_ns)


def is_temp_name(name: str) -> bool:
    """Names a writer uses while a file is incomplete (and hidden files)."""
    lower = name.lower()
    return name.startswith((".", "~$")) or lower.endswith(TEMP_SUFFIXES)


class FolderSource:
    """Frames from image files under ``root``.

    Product: ``product`` when given, else the first sub-folder name (``root/<product>/...``). On ack a
    frame's file is moved to ``done_dir`` (dead letters to ``failed_dir``), or with ``after="record"``
    its (path, size, mtime) is appended to a ledger; either way a restart does not score it again.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        product: str | None = None,
        line: str = "folder",
        after: str = AFTER_MOVE,
        done_dir: str | os.PathLike[str] | None = None,
        failed_dir: str | os.PathLike[str] | None = None,
        ledger: str | os.PathLike[str] | None = None,
        suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
        poll_interval_s: float = 0.5,
        max_bytes: int = 64 * 1024 * 1024,
        settle_s: float = 1.0,
        notify: bool = True,
        rescan_s: float = 60.0,
    ) -> None:
        if after not in (AFTER_MOVE, AFTER_RECORD):
            raise ValueError(f"after must be {AFTER_MOVE!r} or {AFTER_RECORD!r}, not {after!r}")
        self.root = Path(root).resolve()
        self.product = product
        self.line = line
        self.after = after
        self.done_dir = Path(done_dir) if done_dir is not None else self.root / "done"
        self.failed_dir = Path(failed_dir) if failed_dir is not None else self.root / "failed"
        self.ledger = Path(ledger) if ledger is not None else self.root / LEDGER_NAME
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.poll_interval_s = poll_interval_s
        self.max_bytes = max_bytes
        self.source = safe_text(f"folder:{self.root}")
        self.settle_s = settle_s  # a file is taken once its size and mtime have not changed for this long
        self._last_seen: dict[Path, tuple[Stat, float]] = {}  # path -> (stat, when it was first seen so)
        self._inflight: set[Path] = set()
        self._lock = threading.Lock()
        self._processed: set[tuple[str, int, int]] = self._load_ledger() if after == AFTER_RECORD else set()
        self.finish_errors = 0  # ledger writes / moves that failed (the files are remembered in memory)
        self._noted: set[str] = set()  # paths whose skip reason was logged already
        self._skip: set[Path] | None = None
        self._pending: set[Path] = set()  # seen and not processed yet (unsettled, waiting or in flight)
        # Change notification (watchfiles: inotify on Linux): a poll then looks only at changed paths and at files
        # still waiting, not at every file ever scored; a full walk every rescan_s catches anything missed.
        self.notify = notify
        self.rescan_s = rescan_s
        self.full_walks = 0
        self._dirty: set[Path] = set()
        self._last_full = float("-inf")  # the first poll walks the folder (monotonic time may be < rescan_s)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watching = False  # the notification thread is watching (False while it restarts after a failure)
        self._walk_after_restart = False
        self.watch_failures = 0

    # -- scanning ---------------------------------------------------------------------------------

    def _skip_dirs(self) -> set[Path]:
        if self._skip is None:  # resolved once: a poll must not cost syscalls per poll beyond what changed
            self._skip = {self.done_dir.resolve(), self.failed_dir.resolve()}
        return self._skip

    def _note_once(self, key: str, message: str, *args: object) -> None:
        """Say once per path why it is not scored (0-byte files, broken links, linked folders...)."""
        if key not in self._noted:
            self._noted.add(key)
            log.info(message, *args)

    def _candidates(self) -> dict[Path, Stat]:
        return self._walk(self.root)

    def close(self) -> None:
        """Stop the change-notification thread."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2.0)

    def _start_watcher(self) -> None:
        import watchfiles

        def watch() -> None:
            failures = 0
            while not self._watch_stop.is_set():
                try:
                    self._watching = True
                    for changes in watchfiles.watch(self.root, watch_filter=None, debounce=50, step=20,
                                                    stop_event=self._watch_stop, raise_interrupt=False):
                        failures = 0
                        with self._lock:
                            self._dirty.update(Path(p) for _change, p in changes)
                    return
                except Exception as exc:  # noqa: BLE001 - e.g. a file name that is not UTF-8 (watchfiles cannot
                    #                       decode it): full walks until the notification runs again
                    self._watching = False
                    failures += 1
                    delay = min(WATCH_RESTART_MAX_S, 0.25 * 2 ** failures)
                    log.warning("folder %s: change notification failed (%s); every poll walks the folder until it "
                                "restarts in %.1fs", self.root, exc, delay)
                    self.watch_failures += 1
                    self._watch_stop.wait(delay)

        self._watching = True
        self._watcher = threading.Thread(target=watch, name=f"folder-watch-{self.root.name}", daemon=True)
        self._watcher.start()

    def _changed(self) -> dict[Path, Stat | None]:
        """Paths that changed since the last poll (from the notifications), with their stat (None: gone). The
        notifications also come from inside hidden and symlinked folders (inotify follows links): such paths are
        left out by the same rule a full walk applies (``_walked``)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        changed: dict[Path, Stat | None] = {}
        for path in dirty:
            if path == self.root:
                changed.update(self._walk(path))
                continue
            if not self._in_walked_folder(path):
                continue
            if path.is_dir():  # a folder whatever its name (``x.png/``); a symlinked one is not followed
                if self._walked(path):
                    changed.update(self._walk(path))
                continue
            changed[path] = self._stat_candidate(path)
        return changed

    def _walked(self, folder: Path) -> bool:
        """Whether a folder below the root is looked into: not hidden, not symlinked (said once), not done/ or
        failed/. Full walks and change notifications both ask this, so both see the same files. Callers check the
        folders above first, so ``folder`` has no symlink in it and needs no resolving."""
        if folder.name.startswith("."):
            return False
        if folder.is_symlink():
            self._note_once(f"link:{folder}", "folder %s: %s is a symlinked folder and is not followed (drop files "
                            "into real folders)", self.root, folder)
            return False
        return folder not in self._skip_dirs()

    def _in_walked_folder(self, path: Path) -> bool:
        """Whether every folder between the root and ``path`` is walked (``_walked``)."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return False
        folder = self.root
        for part in parts[:-1]:
            folder = folder / part
            if not self._walked(folder):
                return False
        return True

    def _walk(self, folder: Path) -> dict[Path, Stat]:
        """Every candidate file below ``folder`` (hidden, done/failed and symlinked folders left out)."""
        found: dict[Path, Stat] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if self._walked(here / d))
            for name in sorted(filenames):
                stat = self._stat_candidate(here / name)
                if stat is not None:
                    found[here / name] = stat
        return found

    def _stat_candidate(self, path: Path) -> Stat | None:
        """(size, mtime) of a file worth scoring, or None (not an image name, a temp name, gone, not a regular
        file). A symlinked file is read through its link (and on ack the link, not its target, is moved)."""
        if is_temp_name(path.name) or not path.name.lower().endswith(self.suffixes):
            return None
        try:
            st = path.stat()
        except OSError:  # gone, or a broken link / link loop
            if path.is_symlink():
                self._note_once(f"broken:{path}", "folder %s: %s is a broken link; skipped", self.root, path)
            return None
        if not S_ISREG(st.st_mode):  # a folder named x.png, a fifo (reading it would block), a device
            return None
        if st.st_size == 0:
            self._note_once(f"empty:{path}:{st.st_mtime_ns}", "folder %s: %s is empty (0 bytes); it is taken once it "
                            "has content", self.root, path)
        return st.st_size, st.st_mtime_ns

    def scan(self) -> list[Path]:
        """One poll: files whose (size, mtime) have not changed for ``settle_s`` (a writer still appending keeps
        changing them, however fast polls follow each other), not in flight, not processed. With change
        notification only changed paths and files still waiting are looked at (idle cost stays flat however
        many scored files the folder keeps); a full walk every ``rescan_s`` catches anything missed."""
        now = time.monotonic()
        if self.notify and self._watcher is None:
            self._start_watcher()
        # a walk also while the notification is down: the changes it missed meanwhile are found by walking
        full = (not self.notify or self._watcher is None or not self._watching or self._walk_after_restart
                or now - self._last_full >= self.rescan_s)
        self._walk_after_restart = not self._watching
        if full:
            self.full_walks += 1
            self._last_full = now
            current = self._candidates()
            with self._lock:
                self._last_seen = {p: v for p, v in self._last_seen.items() if p in current}
            consider: dict[Path, Stat | None] = dict(current)
        else:
            consider = self._changed()
            for path in self._pending - consider.keys():  # None (gone) if a folder above became a link meanwhile
                consider[path] = self._stat_candidate(path) if self._in_walked_folder(path) else None
        ready = []
        with self._lock:
            for path, stat in consider.items():
                if stat is None:  # gone
                    self._last_seen.pop(path, None)
                    self._pending.discard(path)
                    continue
                previous = self._last_seen.get(path)
                since = previous[1] if previous is not None and previous[0] == stat else now
                self._last_seen[path] = (stat, since)
                if (self._rel(path), *stat) in self._processed:
                    if path not in self._inflight and previous is None:
                        self._note_once(f"done:{path}:{stat}", "folder %s: %s was scored before (same name, size "
                                        "and mtime in the ledger); skipped", self.root, path)
                    self._pending.discard(path)
                    continue
                self._pending.add(path)
                if path in self._inflight or stat[0] == 0 or now - since < self.settle_s:
                    continue
                ready.append(path)
        return sorted(ready)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # -- reading ----------------------------------------------------------------------------------

    async def read(self, max_count: int, timeout_s: float | None = None) -> list[Item]:
        """Up to ``max_count`` items; polls every ``poll_interval_s`` until some are ready or the
        timeout (default: one poll interval) passes."""
        deadline = time.monotonic() + (self.poll_interval_s if timeout_s is None else timeout_s)
        while True:
            ready = await asyncio.to_thread(self.scan)
            if ready:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await asyncio.sleep(min(self.poll_interval_s, remaining))
        picked = ready[:max_count]
        with self._lock:
            self._inflight.update(picked)
        return await asyncio.to_thread(lambda: [self._load(p) for p in picked])

    def _load(self, path: Path) -> Item:
        rel = self._rel(path)
        parts = rel.split("/")
        product = self.product or (parts[0] if len(parts) > 1 else "")
        stat = self._last_seen.get(path, ((0, 0), 0.0))[0]
        text = safe_text(rel)  # ids and meta are text every sink can encode; file operations keep ``path``
        common = {"product": product, "line": self.line, "frame_id": text, "entry_id": text, "source": self.source}
        meta = {"path": safe_text(str(path))}  # where it was scored
        if self.after == AFTER_MOVE:  # where ack moves it (results are published before: the move is not known yet;
            #                           a name taken there already gets ``.<ns>`` before its suffix)
            meta["done_path"] = safe_text(os.path.abspath(self.done_dir / rel))
        frame = Frame(captured_at=stat[1] / 1e9, meta=meta, **common)

        def dead(reason: Reason, stage: str, detail: str) -> DeadLetter:  # with the file's fields (path in meta)
            frame.ack = self._ack(path, stat, dead=True)
            frame.meta.pop("done_path", None)  # it goes to failed/, and is never scored
            return DeadLetter.of_frame(frame, reason, stage, detail)

        if not product:
            return dead(Reason.NO_PRODUCT, "parse", "file is not in a <product>/ folder and no product is configured")
        if stat[0] > self.max_bytes:
            return dead(Reason.TOO_LARGE, "decode", f"{stat[0]} bytes > {self.max_bytes}")
        try:
            frame.payload = path.read_bytes()
        except OSError as exc:
            return dead(Reason.UNREADABLE, "parse", safe_text(str(exc)))
        frame.ack = self._ack(path, stat, dead=False)
        return frame

    # -- acknowledging ------------------------------------------------------------------------------

    def _ack(self, path: Path, stat: Stat, dead: bool) -> AckHandle:
        async def ack() -> None:
            await asyncio.to_thread(self._finish, path, stat, dead)

        return ack

    def _finish(self, path: Path, stat: Stat, dead: bool) -> None:
        """Move the file away or record it in the ledger. It is remembered in memory first, so a ledger or a
        done/ folder that cannot be written never makes the same file be picked on every poll; that failure is
        logged loudly (first time, then every 100th) and counted in ``finish_errors``."""
        rel = self._rel(path)
        size, mtime_ns = stat
        with self._lock:
            self._processed.add((rel, size, mtime_ns))
        try:
            if self.after == AFTER_MOVE:
                if not self._in_walked_folder(path):  # a folder above was swapped for a symlink since the scan:
                    log.warning("folder %s: a folder above %s is a symlink now; the file is not moved (it lies "
                                "outside the watched folder)", self.root, path)
                    return
                target = (self.failed_dir if dead else self.done_dir) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    target = target.with_name(f"{target.stem}.{time.time_ns()}{target.suffix}")
                if path.exists():
                    shutil.move(str(path), str(target))
            else:
                record = {"path": rel, "size": size, "mtime_ns": mtime_ns, "dead": dead, "at": time.time()}
                with open(self.ledger, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            self.finish_errors += 1
            if self.finish_errors == 1 or self.finish_errors % 100 == 0:
                where = self.ledger if self.after == AFTER_RECORD else self.done_dir
                log.error("folder %s: cannot %s (%s; %d time(s) so far): processed files are remembered in "
                          "memory only and WILL BE SCORED AGAIN after a restart", self.root,
                          f"write the ledger {where}" if self.after == AFTER_RECORD else f"move files into {where}",
                          exc, self.finish_errors)
        finally:
            with self._lock:
                self._inflight.discard(path)

    def _load_ledger(self) -> set[tuple[str, int, int]]:
        done: set[tuple[str, int, int]] = set()
        if not self.ledger.exists():
            return done
        try:
            lines = self.ledger.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            log.error("folder %s: cannot read the ledger %s (%s): files processed before this start WILL BE "
                      "SCORED AGAIN", self.root, self.ledger, exc)
            return done
        for text in lines:
            try:
                rec = json.loads(text)
                done.add((rec["path"], int(rec["size"]), int(rec["mtime_ns"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
        return done
