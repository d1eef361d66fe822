"""Atomic file writes: a hidden temporary file beside the target, then `os.replace` (a reader, a build or the
folder watcher never sees half a file; builds skip dot-files and the watcher skips ``*.tmp``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; when the block ends it replaces ``path``, and when the
    block raises ``path`` is left as it was. The temporary name is unique, so concurrent writers of one file
    cannot collide (the last to finish wins), and it is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, durable: bool = False) -> Path:
    """``path`` holds ``data`` whole (see `replacing`); returns ``path``. ``durable``: the data and the rename are
    on disk (fsynced, the folder too) before it returns, so a power cut cannot leave the name without its bytes."""
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    if durable:
        folder = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8) whole (see `replacing`); returns ``path``."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
