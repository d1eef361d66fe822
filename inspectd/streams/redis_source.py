"""Redis Streams frame source: one consumer of a consumer group over one or more input streams.

Reads only when asked (``read``), own pending entries first, XAUTOCLAIMs entries idle too long (a
crashed consumer's frames), turns entries into Frames (or DeadLetters) whose ``ack`` does XACK.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import ResponseError

from inspectd.streams.message import MAX_META_BYTES, parse_frame_fields
from inspectd.streams.reasons import Reason
from inspectd.streams.redis_keys import line_of_key
from inspectd.streams.schema import AckHandle, DeadLetter, Frame

log = logging.getLogger(__name__)

Item = Frame | DeadLetter


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry_ids_by_stream(items: Iterable[Item]) -> dict[str, list[str]]:
    """Entry ids of this kind of source's items, grouped by input stream."""
    by_stream: dict[str, list[str]] = {}
    for item in items:
        if item.entry_id and item.source.startswith("redis:"):
            by_stream.setdefault(item.source[len("redis:"):], []).append(item.entry_id)
    return by_stream


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def default_consumer_name() -> str:
    """``<hostname>-<pid>``: unique per process, stable for its lifetime."""
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisStreamSource:
    """Consumer ``consumer`` of group ``group`` on ``streams`` (a ``redis.asyncio`` client, bytes replies)."""

    def __init__(
        self,
        client: Any,
        streams: Sequence[str],
        group: str = "inspectd",
        consumer: str | None = None,
        *,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float | None = None,
        group_start_id: str = "0",
        max_deliveries: int = 5,
        max_meta_bytes: int = MAX_META_BYTES,
    ) -> None:
        if not streams:
            raise ValueError("at least one input stream is required")
        self.client = client
        self.streams = list(dict.fromkeys(streams))
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s if claim_interval_s is not None else claim_idle_ms / 2000.0
        self.group_start_id = group_start_id
        self.max_meta_bytes = max_meta_bytes
        self.max_deliveries = max_deliveries  # a frame delivered this often (it keeps killing its consumer)
        #                                       becomes a dead letter instead of being retried forever
        self.claimed_total = 0  # entries taken over from other consumers (for a metric)
        self.deleted_total = 0  # pending entries deleted (trimmed) from the stream before they were scored
        self._started = False
        # Own pending entries still to re-read after a restart: stream -> last id seen ("0" = from start).
        self._backlog: dict[str, str] = {}
        self._claim_cursor: dict[str, str] = {s: "0-0" for s in self.streams}
        self._last_claim = 0.0
        self._rotation = 0  # which streams a read smaller than len(streams) asks first
        # (stream, entry id) delivered by this source and not acked yet: XAUTOCLAIM also returns our own entries
        # idle past claim_idle_ms (a starved keep-alive under load), which must not be handed out a second time
        self._held: set[tuple[str, str]] = set()

    async def start(self) -> None:
        """Create the consumer groups (MKSTREAM; an existing group is fine) and re-read own pending entries."""
        await self._create_groups()
        self._backlog = {s: "0" for s in self.streams}
        self._last_claim = time.monotonic()  # the first claim waits one interval: own backlog first
        self._started = True

    async def _create_groups(self) -> None:
        for stream in self.streams:
            await self._create_group(stream)

    async def _create_group(self, stream: str) -> None:
        try:
            await self.client.xgroup_create(stream, self.group, id=self.group_start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, max_count: int) -> list[Item]:
        """Up to ``max_count`` frames/dead letters; blocks up to ``block_ms`` only when nothing is ready."""
        if max_count <= 0:
            return []
        if not self._started:
            await self.start()
        try:
            items = await self._read(max_count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # A recreated group has no pending entries, so nothing is re-read: the other streams' entries
            # this consumer holds are in flight here, and re-reading their backlog would hand them out twice.
            log.warning("consumer group vanished (%s); recreating", exc)
            await self._create_groups()
            items = await self._read(max_count)
        # Only what an ack releases is held: a claim's trimmed entry (no ack, Redis dropped it from the PEL) is not
        for stream, ids in _entry_ids_by_stream(item for item in items if item.ack is not None).items():
            self._held.update((stream, entry_id) for entry_id in ids)
        return items

    async def _read(self, max_count: int) -> list[Item]:
        out: list[Item] = []
        steps = []
        if self._backlog:
            steps.append(self._read_backlog)
        if time.monotonic() - self._last_claim >= self.claim_interval_s:
            steps.append(self._autoclaim)
        steps.append(lambda count: self._read_new(count, block=not out))
        for step in steps:
            if len(out) >= max_count:
                break
            try:
                out += await step(max_count - len(out))
            except Exception as exc:
                if not out:
                    raise
                # Entries already taken from Redis are handed out now (they are pending here); the failed
                # step's error comes again at the next read, which raises it
                log.warning("reading %s failed after %d entries were read (%s: %s); returning those",
                            ", ".join(self.streams), len(out), type(exc).__name__, exc)
                break
        return out

    async def _read_backlog(self, count: int) -> list[Item]:
        """Entries delivered to this consumer name before (a restart) and never acked."""
        out: list[Item] = []
        for stream in list(self._backlog):
            if len(out) >= count:
                break
            wanted = count - len(out)
            reply = await self.client.xreadgroup(
                self.group, self.consumer, {stream: self._backlog[stream]}, count=wanted)
            entries = reply[0][1] if reply else []
            if len(entries) < wanted:
                # Drained. Dropping the cursor now matters: once ">" delivers new entries they are
                # pending too, and reading on from the cursor would hand them out a second time.
                del self._backlog[stream]
            else:
                self._backlog[stream] = _str(entries[-1][0])
            entries = [e for e in entries if (stream, _str(e[0])) not in self._held]  # in flight here already
            out += await self._redelivered(stream, await self._to_items(stream, entries))
        return out

    async def _autoclaim(self, count: int) -> list[Item]:
        """Take over entries idle longer than ``claim_idle_ms`` in any consumer's pending list. While a scan
        has not reached the end of every pending list (a crashed peer's many frames), the next read goes on
        with it instead of waiting another ``claim_interval_s``: they come back at the read rate."""
        self._last_claim = time.monotonic()
        out: list[Item] = []
        unfinished = False
        for stream in self.streams:
            if len(out) >= count:
                unfinished = True
                break
            next_id, entries, *deleted = await self.client.xautoclaim(
                stream, self.group, self.consumer, self.claim_idle_ms,
                start_id=self._claim_cursor[stream], count=count - len(out))
            self._claim_cursor[stream] = _str(next_id)
            unfinished = unfinished or self._claim_cursor[stream] != "0-0"
            entries = [e for e in entries if (stream, _str(e[0])) not in self._held]  # ours, still being scored
            items = await self._redelivered(stream, await self._to_items(stream, entries))
            # Redis >= 7 drops pending entries that were trimmed away and names them here
            items += [self._deleted(stream, _str(d), None) for d in (deleted[0] if deleted else [])
                      if (stream, _str(d)) not in self._held]
            if items:
                log.info("claimed %d idle entries from %s", len(items), stream)
            self.claimed_total += len(items)
            out += items
        if unfinished:
            self._last_claim = float("-inf")
        return out

    async def _redelivered(self, stream: str, items: list[Item]) -> list[Item]:
        """Entries delivered again (after a crash): past ``max_deliveries`` they become dead letters."""
        ids = [item.entry_id for item in items if isinstance(item, Frame) and item.entry_id]
        if not ids or self.max_deliveries <= 0:
            return items
        deliveries = await self._deliveries(stream, ids)
        out: list[Item] = []
        for item in items:
            times = deliveries.get(item.entry_id or "", 0)
            if isinstance(item, Frame) and times > self.max_deliveries:
                item = DeadLetter(reason=Reason.TOO_MANY_DELIVERIES, stage="parse", product=item.product,
                                  line=item.line, frame_id=item.frame_id, entry_id=item.entry_id, source=item.source,
                                  detail=f"delivered {times} times (max_deliveries {self.max_deliveries}); "
                                         "it may crash the daemon", fields=dict(item.input_fields), ack=item.ack)
            out.append(item)
        return out

    async def _deliveries(self, stream: str, ids: list[str]) -> dict[str, int]:
        """Delivery counts of ``ids`` (this consumer's pending entries). XPENDING's range between the lowest and
        the highest of them also holds every other entry pending here (the frames in flight, ones whose XACK
        failed), so it is paged until all of ``ids`` were seen or the range ends."""
        wanted = set(ids)
        deliveries: dict[str, int] = {}
        start, end = min(ids, key=_id_key), max(ids, key=_id_key)
        page = len(ids) + 100
        while True:
            pending = await self.client.xpending_range(stream, self.group, min=start, max=end, count=page,
                                                       consumername=self.consumer)
            for entry in pending:
                entry_id = _str(entry["message_id"])
                if entry_id in wanted:
                    deliveries[entry_id] = int(entry["times_delivered"])
            if len(pending) < page or len(deliveries) == len(wanted):
                return deliveries
            start = _next_id(_str(pending[-1]["message_id"]))

    async def _read_new(self, count: int, block: bool) -> list[Item]:
        """At most ``count`` new entries. XREADGROUP's COUNT is per stream, so a multi-stream read asks
        each stream for ``count // len(streams)`` (or, when count < len(streams), asks ``count`` streams
        in rotation for one each): nothing is ever delivered that the caller did not ask for, so
        nothing delivered can be left behind un-scored at shutdown."""
        streams = self.streams
        if count < len(streams):
            start = self._rotation % len(streams)
            streams = (streams[start:] + streams[:start])[:count]
            self._rotation += count
        per_stream = max(1, count // len(streams))
        reply = await self.client.xreadgroup(
            self.group, self.consumer, {s: ">" for s in streams}, count=per_stream,
            block=self.block_ms if block and self.block_ms > 0 else None)
        items: list[Item] = []
        for stream, entries in reply or []:
            items += await self._to_items(_str(stream), entries)
        return items

    async def _to_items(self, stream: str, entries: Iterable[tuple[Any, Any]]) -> list[Item]:
        items: list[Item] = []
        for raw_id, fields in entries:
            entry_id = _str(raw_id)
            if not fields:  # entry trimmed/deleted while pending: nothing left to score, but say so
                items.append(self._deleted(stream, entry_id, self.ack_handle(stream, entry_id)))
                continue
            try:
                item = parse_frame_fields(fields, entry_id=entry_id, source=f"redis:{stream}",
                                          default_line=line_of_key(stream), max_meta_bytes=self.max_meta_bytes)
            except Exception as exc:  # noqa: BLE001 - a parser bug dead-letters this entry, not the whole read
                log.exception("entry %s of %s could not be parsed", entry_id, stream)
                item = DeadLetter(reason=Reason.UNREADABLE, stage="parse", line=line_of_key(stream),
                                  frame_id=entry_id, entry_id=entry_id, source=f"redis:{stream}",
                                  detail=f"the parser failed: {type(exc).__name__}: {str(exc)[:200]}")
            item.ack = self.ack_handle(stream, entry_id)
            items.append(item)
        return items

    def _deleted(self, stream: str, entry_id: str, ack: AckHandle | None) -> DeadLetter:
        """A dead letter for a pending entry the stream no longer holds (a producer's MAXLEN, an XDEL)."""
        self.deleted_total += 1
        return DeadLetter(reason=Reason.DELETED_BEFORE_SCORING, stage="parse", product="", line=line_of_key(stream),
                          frame_id=entry_id, entry_id=entry_id, source=f"redis:{stream}",
                          detail="the entry was removed from the input stream while pending (a producer's MAXLEN/"
                                 "XTRIM or an XDEL); its image is gone",
                          ack=ack)

    async def trim_acked(self, keep_s: float) -> dict[str, int]:
        """Retention of acked input: XTRIM MINID each stream below the oldest entry any consumer group still
        needs (its oldest pending entry, or the first it has not been delivered yet), keeping the last
        ``keep_s`` seconds anyway. Returns entries trimmed per stream."""
        trimmed: dict[str, int] = {}
        horizon = f"{max(0, int((time.time() - keep_s) * 1000))}-0"
        for stream in self.streams:
            needed = horizon
            for group in await self.client.xinfo_groups(stream):
                name = _str(group["name"])
                if int(group.get("pending", 0)):
                    summary = await self.client.xpending(stream, name)
                    oldest = _str(summary["min"])
                else:
                    oldest = _next_id(_str(group["last-delivered-id"]))
                needed = min(needed, oldest, key=_id_key)
            count = await self.client.xtrim(stream, minid=needed, approximate=False)
            if count:
                trimmed[stream] = int(count)
        return trimmed

    async def remove_idle_consumers(self, idle_ms: int) -> list[str]:
        """Delete consumers of our group that hold no pending entries and were idle longer than ``idle_ms``
        (names of crashed or replaced instances accumulate otherwise). Never deletes ourselves."""
        removed: list[str] = []
        for stream in self.streams:
            for consumer in await self.client.xinfo_consumers(stream, self.group):
                name = _str(consumer["name"])
                if name != self.consumer and int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle_ms:
                    await self.client.xgroup_delconsumer(stream, self.group, name)
                    removed.append(name)
        if removed:
            log.info("removed %d idle consumer(s) without pending entries: %s", len(removed),
                     ", ".join(sorted(set(removed))))
        return removed

    def ack_handle(self, stream: str, entry_id: str) -> AckHandle:
        """An async callable that XACKs one entry."""

        async def ack() -> None:
            try:
                await self.client.xack(stream, self.group, entry_id)
            finally:  # done here either way: an entry whose XACK failed stays pending and is claimed again
                self._held.discard((stream, entry_id))

        return ack

    async def ack_many(self, items: Iterable[Item]) -> int:
        """XACK many items from this source in one round trip (one XACK per stream); returns the count."""
        by_stream = _entry_ids_by_stream(items)
        if not by_stream:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self.group, *ids)
        try:
            return int(sum(await pipe.execute()))
        finally:  # done here either way: entries whose XACK failed stay pending and are claimed again
            for stream, ids in by_stream.items():
                self._held.difference_update((stream, entry_id) for entry_id in ids)

    async def keep_alive(self, items: Iterable[Item]) -> int:
        """Reset the idle time of entries this consumer still works on, so that no other instance
        XAUTOCLAIMs a frame that is merely queued here. (XCLAIM to ourselves with JUSTID; entries idle
        less than a third of ``claim_idle_ms`` are left alone, so one another instance just claimed
        from a crashed owner is not pulled back.) Returns how many entries were refreshed."""
        by_stream = _entry_ids_by_stream(items)
        if not by_stream:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xclaim(stream, self.group, self.consumer, self.claim_idle_ms // 3, ids, justid=True)
        return sum(len(r) for r in await pipe.execute())

    async def pending_count(self) -> int:
        """Entries delivered to the group but not acked yet, over all input streams (a gauge)."""
        total = 0
        for stream in self.streams:
            try:
                info = await self.client.xpending(stream, self.group)
            except ResponseError:
                continue
            total += int(info["pending"])
        return total


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
