"""The console's review buffer in Redis (``console.review: redis``): one stream per verdict, capped by MAXLEN, so
the daemon holds no review images, a restart keeps them, and every instance's console sees every instance's frames.

Keys (one hash slot, so a Redis Cluster serves them too): ``<prefix>:{console}:review:NG`` and ``...:OK``, each
``XADD ... MAXLEN = keep_ng | keep_ok``. An entry holds the frame's summary (JSON) and its pictures; its entry id is
the frame's review id. Reads fetch one entry by id (XRANGE id id); the live feed tails both streams (XREAD).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from inspectd.daemon.review import ReviewItem

log = logging.getLogger(__name__)

VERDICTS = ("NG", "OK")
FETCH_CACHE = 32  # recently fetched items (a detail view asks for overlay, mask and image in a row)
TAIL_BLOCK_MS = 1000


def review_keys(prefix: str) -> dict[str, str]:
    return {verdict: f"{prefix}:{{console}}:review:{verdict}" for verdict in VERDICTS}


def _to_fields(item: ReviewItem) -> dict[str, Any]:
    fields: dict[str, Any] = {"summary": json.dumps(item.result), "image": item.image_png,
                              "overlay": item.overlay_jpeg, "thumb": item.thumb_jpeg, "mask": item.mask_png or b""}
    if item.amap is not None:
        fields["amap"] = np.ascontiguousarray(item.amap, dtype="<f4").tobytes()
        fields["amap_shape"] = "x".join(str(n) for n in item.amap.shape)
    return fields


def _from_fields(entry_id: str, fields: dict[bytes, bytes]) -> ReviewItem:
    amap = None
    if fields.get(b"amap"):
        shape = tuple(int(n) for n in fields[b"amap_shape"].decode().split("x"))
        amap = np.frombuffer(fields[b"amap"], dtype="<f4").reshape(shape)
    return ReviewItem(entry_id, json.loads(fields[b"summary"]), fields[b"image"], fields[b"overlay"],
                      fields[b"thumb"], fields.get(b"mask") or None, amap)


class RedisReviewStore:
    """Adds, lists and fetches review items in the capped streams; tails them for the live feed."""

    def __init__(self, redis: Any, prefix: str, limits: dict[str, int]) -> None:
        self.redis = redis
        self.keys = review_keys(prefix)
        self.limits = limits
        self._cache: OrderedDict[str, ReviewItem] = OrderedDict()

    async def add(self, item: ReviewItem) -> str:
        verdict = item.result["verdict"]
        entry_id = await self.redis.xadd(self.keys[verdict], _to_fields(item), maxlen=self.limits[verdict],
                                         approximate=False)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def get(self, item_id: str) -> ReviewItem | None:
        if item_id in self._cache:
            self._cache.move_to_end(item_id)
            return self._cache[item_id]
        for key in self.keys.values():
            try:
                entries = await self.redis.xrange(key, item_id, item_id)
            except Exception:  # noqa: BLE001 - a malformed id (not an entry id) finds nothing
                return None
            if entries:
                item = _from_fields(item_id, entries[0][1])
                self._cache[item_id] = item
                while len(self._cache) > FETCH_CACHE:
                    self._cache.popitem(last=False)
                return item
        return None

    async def summaries(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` items' summaries per verdict, NG first, newest first within each."""
        out = []
        for verdict in VERDICTS:
            for entry_id, fields in await self.redis.xrevrange(self.keys[verdict], count=limit):
                summary = json.loads(fields[b"summary"])
                summary.update(id=entry_id.decode(), has_mask=bool(fields.get(b"mask")))
                out.append(summary)
        return out

    async def count(self) -> int:
        return sum([await self.redis.xlen(key) for key in self.keys.values()])

    async def tail(self, on_summary: Callable[[dict[str, Any]], None]) -> None:
        """Call ``on_summary`` for every item any instance adds from now on (until cancelled)."""
        last = {key: "$" for key in self.keys.values()}
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
                for entry_id, fields in entries:
                    entry = entry_id.decode()
                    last[key] = entry
                    summary = json.loads(fields[b"summary"])
                    summary.update(id=entry, has_mask=bool(fields.get(b"mask")))
                    on_summary(summary)
