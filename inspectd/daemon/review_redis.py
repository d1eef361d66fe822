"""The console's review buffer in Redis (``console.review: redis``): per verdict, a stream of summaries capped at
``keep_ng`` / ``keep_ok`` entries and a hash of their pictures, so the daemon holds no review images, a restart keeps
them, and every instance's console sees every instance's frames.

Keys (one hash slot, so a Redis Cluster serves them too): ``<prefix>:{console}:review:NG`` (stream: one small
``summary`` field per frame; listing and the live feed read only this) and ``<prefix>:{console}:review:NG:pictures``
(hash: entry id -> packed pictures), the same for OK, and ``<prefix>:{console}:review:feedback`` (hash: entry id ->
the feedback given on it, claimed with HSETNX so two instances' operators never act on one frame twice; recorded
only while its item is kept). One Lua script adds an item and trims the oldest ones from all three, atomically, so
they never disagree and the bound is exact however many instances write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from inspectd.daemon.review import ReviewItem

log = logging.getLogger(__name__)

VERDICTS = ("NG", "OK")
FETCH_CACHE = 16  # recently fetched items (a detail view asks for overlay, mask and image in a row)
TAIL_BLOCK_MS = 1000
BLOBS = ("image", "overlay", "thumb", "mask", "amap", "original")

ADD_AND_TRIM = """
local id = redis.call('XADD', KEYS[1], '*', 'summary', ARGV[2])
redis.call('HSET', KEYS[2], id, ARGV[3])
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)) do
    redis.call('HDEL', KEYS[2], entry[1])
    redis.call('HDEL', KEYS[3], entry[1])
    redis.call('XDEL', KEYS[1], entry[1])
  end
end
return id
"""


# a mark is set only on an item still held: one trimmed while its feedback ran (under an all-NG line an item lives
# seconds, a rebuild takes longer) would leave its mark in the hash for ever
MARK_IF_KEPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""


def review_keys(prefix: str) -> dict[str, tuple[str, str]]:
    """verdict -> (summary stream, pictures hash)."""
    return {v: (f"{prefix}:{{console}}:review:{v}", f"{prefix}:{{console}}:review:{v}:pictures") for v in VERDICTS}


def feedback_key(prefix: str) -> str:
    """The hash of feedback marks (entry id -> the feedback's record), shared by every instance's console."""
    return f"{prefix}:{{console}}:review:feedback"


def pack(item: ReviewItem) -> bytes:
    """The item's pictures as one value: a 4-byte header length, a JSON header (sizes, map shape, suffix), bytes."""
    amap = b"" if item.amap is None else np.ascontiguousarray(item.amap, dtype="<f4").tobytes()
    blobs = {"image": item.image_png, "overlay": item.overlay_jpeg, "thumb": item.thumb_jpeg,
             "mask": item.mask_png or b"", "amap": amap, "original": item.original or b""}
    header = json.dumps({"sizes": [len(blobs[k]) for k in BLOBS], "has_mask": item.mask_png is not None,
                         "amap_shape": None if item.amap is None else list(item.amap.shape),
                         "original_suffix": item.original_suffix}).encode()
    return struct.pack(">I", len(header)) + header + b"".join(blobs[k] for k in BLOBS)


def unpack(item_id: str, summary: dict[str, Any], data: bytes) -> ReviewItem:
    (length,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + length])
    blobs, offset = {}, 4 + length
    for key, size in zip(BLOBS, header["sizes"], strict=True):
        blobs[key], offset = data[offset:offset + size], offset + size
    amap = None if header["amap_shape"] is None else np.frombuffer(blobs["amap"], dtype="<f4").reshape(
        header["amap_shape"])
    return ReviewItem(item_id, summary, blobs["image"], blobs["overlay"], blobs["thumb"],
                      blobs["mask"] if header["has_mask"] else None, amap, blobs["original"] or None,
                      header["original_suffix"])


def _summary(entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    summary = json.loads(fields[b"summary"])
    summary["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return summary


def _summaries(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The entries' summaries, leaving out any that is not one (written to the stream by something else)."""
    out = []
    for entry_id, fields in entries:
        try:
            summary = _summary(entry_id, fields)
        except (KeyError, ValueError, TypeError, AttributeError):
            log.warning("console: review stream entry %r is not a review summary; ignored", entry_id)
            continue
        if isinstance(summary, dict) and isinstance(summary.get("product"), str) and "line" in summary:
            out.append(summary)
    return out


def _decoded(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisReviewStore:
    """Adds, lists and fetches review items in the capped streams; tails them for the live feed."""

    def __init__(self, redis: Any, prefix: str, limits: dict[str, int]) -> None:
        self.redis = redis
        self.keys = review_keys(prefix)
        self.marks = feedback_key(prefix)
        self.limits = limits
        self._add = redis.register_script(ADD_AND_TRIM)
        self._mark = redis.register_script(MARK_IF_KEPT)
        self._cache: OrderedDict[str, ReviewItem] = OrderedDict()

    async def add(self, item: ReviewItem) -> str:
        verdict = item.result["verdict"]
        summary = {**item.result, "has_mask": item.mask_png is not None}
        entry_id = await self._add(keys=[*self.keys[verdict], self.marks],
                                   args=[self.limits[verdict], json.dumps(summary), pack(item)])
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def get(self, item_id: str) -> ReviewItem | None:
        if item_id in self._cache:
            self._cache.move_to_end(item_id)
            item = self._cache[item_id]
            pictures = self.keys.get(item.result.get("verdict"), self.keys["NG"])[1]
            if not await self.redis.hexists(pictures, item_id):  # trimmed since: gone, as it would be from memory
                del self._cache[item_id]
                return None
            item.feedback = await self.mark_of(item_id)  # another instance's console may have given or undone it
            return item
        for stream, pictures in self.keys.values():
            data = await self.redis.hget(pictures, item_id)
            if data is None:
                continue
            try:
                entries = await self.redis.xrange(stream, item_id, item_id)
            except Exception:  # noqa: BLE001 - not an entry id
                return None
            if not entries:
                return None
            summaries = _summaries(entries)
            if not summaries:
                return None
            item = unpack(item_id, summaries[0], data)
            item.feedback = await self.mark_of(item_id)
            self._cache[item_id] = item
            while len(self._cache) > FETCH_CACHE:
                self._cache.popitem(last=False)
            return item
        return None

    async def summaries(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` summaries per verdict, NG first, newest first within each (no picture is read)."""
        out = []
        for stream, _ in self.keys.values():
            out += _summaries(await self.redis.xrevrange(stream, count=limit))
        marks = await self.redis.hmget(self.marks, [s["id"] for s in out]) if out else []
        for summary, mark in zip(out, marks, strict=True):
            summary["feedback"] = json.loads(mark) if mark else None
        return out

    async def mark_of(self, item_id: str) -> dict[str, Any] | None:
        mark = await self.redis.hget(self.marks, item_id)
        return json.loads(mark) if mark else None

    async def claim(self, item_id: str) -> bool:
        """Reserve ``item_id`` for one feedback action (False: some instance's console already has it)."""
        return bool(await self.redis.hsetnx(self.marks, item_id, json.dumps({"action": "pending"})))

    async def mark(self, item_id: str, record: dict[str, Any] | None) -> None:
        """Record (or, with None, clear) the feedback on ``item_id`` for every instance."""
        self._cache.pop(item_id, None)
        if record is None:
            await self.redis.hdel(self.marks, item_id)
        else:
            await self._mark(keys=[*(self.keys[v][1] for v in VERDICTS), self.marks],
                             args=[item_id, json.dumps(record)])

    async def count(self) -> int:
        return sum([await self.redis.xlen(stream) for stream, _ in self.keys.values()])

    async def tail(self, on_summary: Callable[[dict[str, Any]], None]) -> None:
        """Call ``on_summary`` for every item any instance adds from now on (until cancelled)."""
        # each stream's newest id now, never "$" on every read: "$" means "what comes after this call", so an entry
        # added to one stream while the other's reply was being handled would never be heard
        last: dict[str, str] = {}
        while not last:
            try:
                for stream, _ in self.keys.values():
                    newest = await self.redis.xrevrange(stream, count=1)
                    last[stream] = _decoded(newest[0][0]) if newest else "0-0"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away at start: as below
                last = {}
                log.warning("console: review stream read failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
        while True:
            try:
                replies = await self.redis.xread(last, block=TAIL_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the live feed pauses, scoring goes on
                log.warning("console: review stream read failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for key, entries in replies or []:
                key = key.decode() if isinstance(key, bytes) else key
                if entries:
                    last[key] = _decoded(entries[-1][0])
                for summary in _summaries(entries):
                    on_summary(summary)
