"""The console's review buffer in Redis (``console.review: redis``): per verdict, a stream of summaries capped at
``keep_ng`` / ``keep_ok`` entries and a hash of their pictures, so the daemon holds no review images, a restart keeps
them, and every instance's console sees every instance's frames.

Keys (one hash slot, so a Redis Cluster serves them too): ``<prefix>:{console}:review:NG`` (stream: one small
``summary`` field per frame; listing and the live feed read only this) and ``<prefix>:{console}:review:NG:pictures``
(hash: entry id -> packed pictures), the same for OK, and ``<prefix>:{console}:review:feedback`` (hash: entry id ->
the feedback given on it; recorded only while its item is kept). The frames as scored (``original``) are apart, in
``<prefix>:{console}:review:originals`` (hash: entry id -> bytes) with ``...:originals:order`` (sorted set, oldest
first) and ``...:originals:meta`` (their running byte total): within ``original_budget`` bytes, as in memory the
oldest give theirs up first (their feedback saves the review image). An action first claims its frame there with a
``pending`` mark carrying its owner and Redis's time, renewed while the action runs, so two instances' operators
never act on one frame twice, and a claim whose daemon died (no longer renewed) is taken over after
``CLAIM_TTL_S`` instead of refusing feedback on that frame until it is trimmed. One Lua script adds an item and trims
the oldest ones (and the oldest originals over the budget) from all of them, atomically, so they never disagree and
both bounds are exact however many instances write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from inspectd.daemon.review import ReviewItem
from inspectd.streams.retry import CAP_S, Backoff

log = logging.getLogger(__name__)

VERDICTS = ("NG", "OK")
FETCH_CACHE = 16  # recently fetched items (a detail view asks for overlay, mask and image in a row)
FETCH_CACHE_BYTES = 64 * 1024 * 1024  # and at most this much of them (beyond the newest): originals are large
TAIL_BLOCK_MS = 1000
BLOBS = ("image", "overlay", "thumb", "mask", "amap", "original")
CLAIM_TTL_S = 300.0  # a claim not renewed this long is a dead daemon's (its holder renews it every quarter of this)
COUNT_EVERY_S = 1.0  # the live feed re-counts the buffer (for its gauge) at most this often
ORIGINAL_BUDGET = 256 * 1024 * 1024  # bytes of originals kept, unless told (the hub passes console.original_budget_mb)
MARK_ATTEMPTS = 6  # a feedback mark is tried this often (seconds, with the backoff), then retried in the background

# KEYS: stream, pictures, marks, originals, their order, their meta ("bytes" total, "seq"); ARGV: the verdict's cap,
# summary, packed pictures, the original ("" for none), the originals' byte budget
ADD_AND_TRIM = """
local id = redis.call('XADD', KEYS[1], '*', 'summary', ARGV[2])
redis.call('HSET', KEYS[2], id, ARGV[3])
local function drop_original(entry)
  local size = redis.call('HSTRLEN', KEYS[4], entry)
  if size > 0 then
    redis.call('HDEL', KEYS[4], entry)
    redis.call('HINCRBY', KEYS[6], 'bytes', -size)
  end
  redis.call('ZREM', KEYS[5], entry)
end
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)) do
    redis.call('HDEL', KEYS[2], entry[1])
    redis.call('HDEL', KEYS[3], entry[1])
    drop_original(entry[1])
    redis.call('XDEL', KEYS[1], entry[1])
  end
end
local budget = tonumber(ARGV[5])
if #ARGV[4] > 0 and #ARGV[4] <= budget then
  redis.call('HSET', KEYS[4], id, ARGV[4])
  redis.call('HINCRBY', KEYS[6], 'bytes', #ARGV[4])
  redis.call('ZADD', KEYS[5], redis.call('HINCRBY', KEYS[6], 'seq', 1), id)
end
while tonumber(redis.call('HGET', KEYS[6], 'bytes') or '0') > budget do
  local oldest = redis.call('ZRANGE', KEYS[5], 0, 0)
  if #oldest == 0 then
    redis.call('HSET', KEYS[6], 'bytes', 0)  -- a total that outlived its originals (deleted by hand)
    break
  end
  drop_original(oldest[1])
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


# a mark is valid when it is a JSON object with a string "action" (the same rule as `_valid_mark`); anything else (a
# forged value, another version's) is no mark: it neither blocks feedback nor breaks a listing
MARK_RULE = """
local function decoded(mark)
  if not mark then return nil end
  local ok, value = pcall(cjson.decode, mark)
  if ok and type(value) == 'table' and type(value.action) == 'string' then return value end
  return nil
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# taken when there is no (valid) mark, or a pending claim not renewed for ARGV[3] s; a claim an older version wrote
# carries no time: it is stamped now and refused, so it expires like the others, never taken while it may be live
CLAIM = MARK_RULE + """
local old = decoded(redis.call('HGET', KEYS[1], ARGV[1]))
local t = now()
if old then
  if old.action ~= 'pending' then return 0 end
  local at = tonumber(old.at)
  if at == nil then
    old.at = t
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(old))
    return 0
  end
  if t - at < tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({action = 'pending', owner = ARGV[2], at = t}))
return 1
"""

# ARGV[3] "renew": the claim's time moves on; "release": it goes. Only the claim ARGV[2] owns.
RENEW_OR_RELEASE = MARK_RULE + """
local old = decoded(redis.call('HGET', KEYS[1], ARGV[1]))
if not old or old.action ~= 'pending' or old.owner ~= ARGV[2] then return 0 end
if ARGV[3] == 'release' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  old.at = now()
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(old))
end
return 1
"""


_WARNED: set[str] = set()  # items whose mark was reported as no mark


def _valid_mark(item_id: str, mark: bytes | str | None, ttl_s: float) -> dict[str, Any] | None:
    """The feedback a mark records, as the console shows it: None for none, for a value that is no mark (logged),
    and for a claim whose daemon died (not renewed for ``ttl_s``: the frame takes feedback again)."""
    if not mark:
        return None
    try:
        value = json.loads(mark)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("action"), str):
        if item_id not in _WARNED:  # once per item, not at every listing
            if len(_WARNED) >= 1024:
                _WARNED.clear()
            _WARNED.add(item_id)
            log.warning("console: the feedback mark on review item %r is not one (%r); ignored", item_id, mark[:80])
        return None
    if value["action"] == "pending":
        at = value.get("at")
        if not isinstance(at, (int, float)) or time.time() - at >= ttl_s:
            return None
        return {"action": "pending", "at": at}  # not its owner's token
    return value


def review_keys(prefix: str) -> dict[str, tuple[str, str]]:
    """verdict -> (summary stream, pictures hash)."""
    return {v: (f"{prefix}:{{console}}:review:{v}", f"{prefix}:{{console}}:review:{v}:pictures") for v in VERDICTS}


def feedback_key(prefix: str) -> str:
    """The hash of feedback marks (entry id -> the feedback's record), shared by every instance's console."""
    return f"{prefix}:{{console}}:review:feedback"


def originals_keys(prefix: str) -> tuple[str, str, str]:
    """(originals hash, their order: a sorted set, oldest first, their meta: a hash of "bytes" and "seq")."""
    base = f"{prefix}:{{console}}:review:originals"
    return base, f"{base}:order", f"{base}:meta"


def pack(item: ReviewItem, original: bool = True) -> bytes:
    """The item's pictures as one value: a 4-byte header length, a JSON header (sizes, map shape, suffix), bytes.
    Without ``original`` its original is left out (the store keeps originals apart, within their budget)."""
    amap = b"" if item.amap is None else np.ascontiguousarray(item.amap, dtype="<f4").tobytes()
    blobs = {"image": item.image_png, "overlay": item.overlay_jpeg, "thumb": item.thumb_jpeg,
             "mask": item.mask_png or b"", "amap": amap, "original": (item.original or b"") if original else b""}
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

    def __init__(self, redis: Any, prefix: str, limits: dict[str, int], claim_ttl_s: float | None = None,
                 original_budget: int | None = None) -> None:
        """``original_budget``: bytes of originals kept in Redis, all instances together (`ReviewHub.use_store`
        sets console.original_budget_mb)."""
        self.redis = redis
        self.keys = review_keys(prefix)
        self.marks = feedback_key(prefix)
        self.originals = originals_keys(prefix)
        self.limits = limits
        self.original_budget = ORIGINAL_BUDGET if original_budget is None else original_budget
        self.claim_ttl_s = CLAIM_TTL_S if claim_ttl_s is None else claim_ttl_s
        self._add = redis.register_script(ADD_AND_TRIM)
        self._mark = redis.register_script(MARK_IF_KEPT)
        self._claim = redis.register_script(CLAIM)
        self._renew_or_release = redis.register_script(RENEW_OR_RELEASE)
        # id -> (item, its original kept apart, bytes): fetched recently
        self._cache: OrderedDict[str, tuple[ReviewItem, bool, int]] = OrderedDict()
        self._claims: dict[str, tuple[str, asyncio.Task]] = {}  # item id -> (owner token, its renewal) held here
        self._writers: dict[str, asyncio.Task] = {}  # item id -> a mark Redis refused, being retried

    async def add(self, item: ReviewItem) -> str:
        verdict = item.result["verdict"]
        summary = {**item.result, "has_mask": item.mask_png is not None}
        entry_id = await self._add(keys=[*self.keys[verdict], self.marks, *self.originals],
                                   args=[self.limits[verdict], json.dumps(summary), pack(item, original=False),
                                         item.original or b"", self.original_budget])
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def get(self, item_id: str) -> ReviewItem | None:
        if item_id in self._cache:
            self._cache.move_to_end(item_id)
            item, apart, _ = self._cache[item_id]
            pictures = self.keys.get(item.result.get("verdict"), self.keys["NG"])[1]
            pipe = self.redis.pipeline(transaction=False)  # one round trip (a detail view asks three times in a row)
            pipe.hexists(pictures, item_id)
            pipe.hexists(self.originals[0], item_id)
            pipe.hget(self.marks, item_id)
            kept, has_original, mark = await pipe.execute()
            if not kept:  # trimmed since: gone, as it would be from memory
                del self._cache[item_id]
                return None
            if apart and item.original is not None and not has_original:
                item.original = None  # over the budget since: feedback saves the review image, on every instance
            item.feedback = _valid_mark(item_id, mark, self.claim_ttl_s)  # another console may have given or undone it
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
            try:
                item = unpack(item_id, summaries[0], data)
            except (struct.error, ValueError, KeyError, TypeError) as exc:  # forged, or another version's format
                log.warning("console: the pictures of review item %r cannot be read (%s); not shown", item_id, exc)
                return None
            original = await self.redis.hget(self.originals[0], item_id)
            if original:  # else none, or one packed with the pictures by an older version
                item.original = original
            item.feedback = await self.mark_of(item_id)
            self._cache[item_id] = (item, bool(original), len(data) + len(original or b""))
            while len(self._cache) > FETCH_CACHE or len(self._cache) > 1 \
                    and sum(size for _, _, size in self._cache.values()) > FETCH_CACHE_BYTES:
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
            summary["feedback"] = _valid_mark(summary["id"], mark, self.claim_ttl_s)
        return out

    async def mark_of(self, item_id: str) -> dict[str, Any] | None:
        return _valid_mark(item_id, await self.redis.hget(self.marks, item_id), self.claim_ttl_s)

    async def claim(self, item_id: str) -> bool:
        """Reserve ``item_id`` for one feedback action (False: some instance's console has it or gave feedback on
        it). The claim is renewed here until `mark` or `release` ends it."""
        if item_id in self._claims:
            return False
        owner = secrets.token_hex(8)
        if not await self._claim(keys=[self.marks], args=[item_id, owner, self.claim_ttl_s]):
            return False
        self._claims[item_id] = (owner, asyncio.create_task(self._renew(item_id, owner), name="console-claim"))
        return True

    async def _renew(self, item_id: str, owner: str) -> None:
        while True:
            await asyncio.sleep(self.claim_ttl_s / 4)
            try:
                if not await self._renew_or_release(keys=[self.marks], args=[item_id, owner, "renew"]):
                    log.warning("console: the feedback claim on review item %r was lost (trimmed or taken over)",
                                item_id)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away a moment: the next renewal tries again
                log.warning("console: could not renew the feedback claim on review item %r (%s)", item_id, exc)

    def _end_claim(self, item_id: str) -> str | None:
        owner, task = self._claims.pop(item_id, (None, None))
        if task is not None:
            task.cancel()
        return owner

    async def release(self, item_id: str) -> None:
        """Give up this console's claim on ``item_id`` (its action failed); a claim that is not ours stays."""
        owner = self._end_claim(item_id)
        if owner is not None:
            await self._renew_or_release(keys=[self.marks], args=[item_id, owner, "release"])

    async def mark(self, item_id: str, record: dict[str, Any] | None) -> None:
        """Record (or, with None, clear) the feedback on ``item_id`` for every instance. Redis failing meanwhile
        is retried with the backoff, this console's claim on the frame renewed until the mark is written (the
        action is done: no console may act on the frame again); after ``MARK_ATTEMPTS`` in the background."""
        self._cache.pop(item_id, None)
        earlier = self._writers.pop(item_id, None)
        if earlier is not None:  # a mark still being retried: this one is newer
            earlier.cancel()
        backoff = Backoff(cap=min(CAP_S, self.claim_ttl_s / 8))  # retried well within a claim's lifetime
        try:
            for attempt in range(MARK_ATTEMPTS):
                if attempt:
                    await backoff.wait()
                if await self._write_mark(item_id, record, warn=not attempt):
                    return
        except asyncio.CancelledError:  # the request gave up: the mark must still be written
            self._mark_later(item_id, record, backoff)
            raise
        log.error("console: the feedback on review item %r is not recorded in Redis yet; retrying in the "
                  "background, its claim kept", item_id)
        self._mark_later(item_id, record, backoff)

    async def _write_mark(self, item_id: str, record: dict[str, Any] | None, warn: bool = False) -> bool:
        """One try at the mark; written (or the item trimmed meanwhile), the claim on it ends here."""
        try:
            if record is None:
                await self.redis.hdel(self.marks, item_id)
            else:
                await self._mark(keys=[*(self.keys[v][1] for v in VERDICTS), self.marks],
                                 args=[item_id, json.dumps(record)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away a moment: tried again
            if warn:
                log.warning("console: could not record the feedback on review item %r (%s); retrying", item_id, exc)
            return False
        self._end_claim(item_id)
        return True

    def _mark_later(self, item_id: str, record: dict[str, Any] | None, backoff: Backoff) -> None:
        async def retry() -> None:
            while True:
                await backoff.wait()
                if await self._write_mark(item_id, record):
                    break
            self._writers.pop(item_id, None)
            log.info("console: the feedback on review item %r is recorded now", item_id)

        self._writers[item_id] = asyncio.create_task(retry(), name="console-mark")

    async def count(self) -> int:
        return sum([await self.redis.xlen(stream) for stream, _ in self.keys.values()])

    async def close(self) -> None:
        """Stop renewing claims and retrying marks (a shutdown: those claims expire unless their actions end
        first, and a frame whose mark was not written takes feedback again then)."""
        if self._writers:
            log.error("console: shutting down with the feedback on review item(s) %s not recorded in Redis",
                      ", ".join(map(repr, self._writers)))
        tasks = [task for _, task in self._claims.values()] + list(self._writers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def tail(self, on_summary: Callable[[dict[str, Any]], None],
                   on_count: Callable[[int], None] | None = None) -> None:
        """Call ``on_summary`` for every item any instance adds from now on (until cancelled), and ``on_count``
        with the number of items kept, at start and after additions (at most every ``COUNT_EVERY_S``)."""
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
        stale, counted = on_count is not None, -COUNT_EVERY_S  # stale: an addition not counted yet
        while True:
            try:
                if stale and time.monotonic() - counted >= COUNT_EVERY_S:
                    on_count(await self.count())
                    stale, counted = False, time.monotonic()
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
                    stale = on_count is not None
                for summary in _summaries(entries):
                    on_summary(summary)
