"""JSONL file sink: one JSON object per result or dead letter, masks as PNG files in a side folder
(path in the record, each file written whole by a rename), flushed and fsynced per batch before ``publish_batch``
returns (a record's mask file before it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inspectd import atomic
from inspectd.streams.folder import IMAGE_SUFFIXES
from inspectd.streams.records import (
    MaskPolicies,
    MaskPolicy,
    check_mask_bits,
    dead_letter_record,
    encode_result_mask,
    policy_for,
    result_record,
    safe_file_name,
)
from inspectd.streams.schema import DeadLetter, Result

_safe = safe_file_name


def ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last byte is a newline."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return True
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except FileNotFoundError:
        return True


WRITTEN_KEPT = 4096  # mask files remembered, so that a retried publish rewrites its own


def frame_file_stem(frame_id: str, entry_id: str | None = None) -> str:
    """A readable file-name stem unique per frame (mask files here, ``tail --save``, ``overlay``): the image suffix
    dropped (``00.png`` -> ``00``: no doubled suffixes), a short hash when the id had to be sanitised, the entry id
    appended when it is not the frame id."""
    def bare(name: str) -> str:
        return name.rsplit(".", 1)[0] if name.lower().endswith(IMAGE_SUFFIXES) else name

    stem = _safe(bare(frame_id))
    if stem != bare(frame_id):  # "a/x.png", "a_x.png", "a x.png" sanitise alike: keep them apart
        stem += "-" + hashlib.sha1(frame_id.encode()).hexdigest()[:8]
    if entry_id and bare(entry_id) != bare(frame_id):
        stem += "_" + _safe(bare(entry_id))  # still unique when producers reuse frame ids
    return stem


class JsonlSink:
    """Appends records to ``path``; with ``mask_dir`` set, masks go to ``<mask_dir>/<product>/<id>.png``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mask_dir: str | os.PathLike[str] | None = None,
        mask_policy: MaskPolicies = None,
        default_mask_policy: MaskPolicy | None = None,
        fsync: bool = True,
        mask_bits: int = 8,
    ) -> None:
        self.path = Path(path)
        self.mask_bits = check_mask_bits(mask_bits)  # mask PNGs: 8- or 16-bit greyscale
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self._policy = mask_policy
        self.default_mask_policy = default_mask_policy or MaskPolicy()
        self.fsync = fsync
        self._lock = threading.Lock()
        self._file: Any = None
        self._written: dict[Path, float] = {}  # mask files written, by capture time (a retry rewrites its own)

    def policy_for(self, product: str) -> MaskPolicy:
        return policy_for(self._policy, product, self.default_mask_policy)

    def _mask_path(self, result: Result) -> Path:
        assert self.mask_dir is not None
        stem = frame_file_stem(result.frame_id, result.entry_id)
        path = self.mask_dir / _safe(result.product or "unknown") / f"{stem}.mask.png"
        if result.entry_id in (None, "", result.frame_id) and path.exists() \
                and self._written.get(path) != result.captured_at:
            # no entry id tells this frame from the one whose mask is there (a watched folder's file dropped again
            # under its name): a name of its own from its capture time, the same when a publish is retried
            path = path.with_name(f"{stem}.{round(result.captured_at * 1e9)}.mask.png")
        self._written[path] = result.captured_at
        while len(self._written) > WRITTEN_KEPT:
            self._written.pop(next(iter(self._written)))
        return path

    def _result_line(self, result: Result) -> dict[str, Any]:
        record = {"kind": "result", **result_record(result, self.mask_bits)}
        if self.mask_dir is not None and result.mask is not None:
            png, note = encode_result_mask(result, self.policy_for(result.product), self.mask_bits)
            record["mask_note"] = note
            if png is not None:
                # whole or not at all for a reader of the folder (a retried publish rewrites the file), and on
                # disk before the record that names it is
                path = atomic.write_bytes(self._mask_path(result), png, durable=self.fsync)
                record["mask_path"] = str(path)
        elif result.mask is not None and not result.mask_note:
            record["mask_note"] = "mask not saved (no mask folder configured)"
        return record

    def write_batch(self, results: Sequence[Result], dead_letters: Sequence[DeadLetter] = ()) -> int:
        """Blocking write of one batch; returns the number of records written."""
        lines = [self._result_line(r) for r in results]
        lines += [{"kind": "dead_letter", **dead_letter_record(d)} for d in dead_letters]
        if not lines:
            return 0
        text = "".join(json.dumps(rec, separators=(",", ":"), default=str) + "\n" for rec in lines)
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open across batches
                if not ends_with_newline(self.path):
                    # a crash (kill -9) mid-line left a torn last line: end it, or the next record would be
                    # glued onto it and lost to every reader
                    self._file.write("\n")
            self._file.write(text)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        return len(lines)

    async def publish_batch(self, results: Sequence[Result], dead_letters: Sequence[DeadLetter] = ()) -> int:
        """Write the batch in a worker thread; returns after the data is flushed (and fsynced)."""
        return await asyncio.to_thread(self.write_batch, results, dead_letters)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
