"""Publishing a batch's results and dead letters to every sink: retry what may heal, isolate what never will.

A transient failure (Redis unreachable or failing over, a full disk) is retried with the shared
backoff (`retry.Backoff`), keeping the frames (at-least-once). A permanent one (a key or value Redis or a
sink refuses) is isolated: the batch is published item by item and only the items that fail for a
permanent reason are replaced by an ``unpublishable`` dead letter on their source stream's line, so
one bad item never blocks the frames behind it. ``stalled_for`` tells liveness how long the current
publish has been going on — retrying or hanging (systemd's watchdog restarts a daemon whose publishing
makes no progress while work waits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from inspectd.streams.reasons import Reason
from inspectd.streams.redis_keys import line_of_key, validate_line
from inspectd.streams.retry import Backoff
from inspectd.streams.schema import DeadLetter, Result
from inspectd.streams.text import safe_text

log = logging.getLogger(__name__)

TRANSIENT = (OSError, TimeoutError, asyncio.TimeoutError, redis_errors.ConnectionError, redis_errors.TimeoutError,
             redis_errors.BusyLoadingError, redis_errors.ReadOnlyError, redis_errors.TryAgainError,
             redis_errors.ClusterDownError, redis_errors.MasterDownError, redis_errors.OutOfMemoryError,
             # a cluster mid-failover: the client's redirects ran out, or no node serves the slot yet
             redis_errors.ClusterError, redis_errors.SlotNotCoveredError)


def is_transient(exc: BaseException) -> bool:
    """True for failures that may heal by themselves (retry); False for a refusal that will repeat."""
    return isinstance(exc, TRANSIENT)


def source_line(source: str) -> str:
    """The line of the stream a frame was read from ("" when it did not come from a keyed stream)."""
    line = line_of_key(source.removeprefix("redis:")) if source else ""
    try:
        return validate_line(line) if line else ""
    except ValueError:
        return ""


class Publisher:
    """Publishes to ``sinks`` (objects with ``publish_batch(results, dead)``) until it has succeeded."""

    def __init__(self, sinks: Sequence[Any], metrics: Any) -> None:
        self.sinks = sinks
        self.metrics = metrics
        self._busy_since: float | None = None
        self.unpublishable = 0
        # per sink, the ids of the items of the publish in progress that the sink confirmed: a retry or the
        # isolation sends each sink only what it has not written yet (a refused batch's other items were written)
        self._written: dict[int, set[int]] = {}

    def stalled_for(self) -> float:
        """Seconds the publish in progress has taken so far (0 when none runs); a healthy one takes ms."""
        return 0.0 if self._busy_since is None else time.monotonic() - self._busy_since

    async def publish(self, results: list[Result], dead: list[DeadLetter]) -> tuple[list[Result], list[DeadLetter]]:
        """Publish everything; returns what was published (results, and dead letters incl. replacements)."""
        backoff = Backoff()
        isolating = False
        self._busy_since = time.monotonic()
        self._written = {id(sink): set() for sink in self.sinks}
        try:
            while True:
                try:
                    if isolating:  # item by item; a transient failure meanwhile retries the isolation
                        return await self._isolate(results, dead)
                    await self._all(results, dead)
                    return results, dead
                except Exception as exc:  # noqa: BLE001 - classified right below
                    self.metrics.error("publish")
                    if is_transient(exc):
                        delay = backoff.next_delay()
                        log.warning("publishing %d item(s) failed (%s: %s); retrying in %.2fs",
                                    len(results) + len(dead), type(exc).__name__, exc, delay)
                        await asyncio.sleep(delay)
                        continue
                    if isolating:  # _isolate turns every permanent refusal into a dead letter itself
                        raise
                    log.error("publishing a batch failed permanently (%s: %s); isolating the bad item(s)",
                              type(exc).__name__, exc)
                    isolating = True
        finally:
            self._busy_since = None
            self._written = {}

    async def _all(self, results: Sequence[Result], dead: Sequence[DeadLetter]) -> None:
        """Each sink gets the items it has not confirmed yet; a sink's error may name (``published``) the items
        it wrote before refusing the others."""
        for sink in self.sinks:
            written = self._written.setdefault(id(sink), set())
            todo_results = [r for r in results if id(r) not in written]
            todo_dead = [d for d in dead if id(d) not in written]
            if not todo_results and not todo_dead:
                continue
            try:
                await sink.publish_batch(todo_results, todo_dead)
            except Exception as exc:
                written.update(id(item) for item in getattr(exc, "published", None) or ())
                raise
            written.update(id(item) for item in (*todo_results, *todo_dead))

    async def _isolate(self, results: list[Result], dead: list[DeadLetter]) -> tuple[list[Result], list[DeadLetter]]:
        """Publish item by item; a permanently refused one is replaced by (published as) a dead letter. A transient
        failure meanwhile propagates and `publish` retries the isolation (duplicates at most, never a loss)."""
        kept_results: list[Result] = []
        kept_dead: list[DeadLetter] = []
        replacements: list[DeadLetter] = []
        for result in results:
            problem = await self._refusal([result], [])
            if problem is None:
                kept_results.append(result)
            else:
                replacements.append(self._unpublishable(result.product, result.line, result.frame_id,
                                                        result.entry_id, result.source, problem,
                                                        result.input_fields))
        for letter in dead:
            problem = await self._refusal([], [letter])
            if problem is None:
                kept_dead.append(letter)
            elif letter.reason != Reason.UNPUBLISHABLE:  # (its frame was counted as a dead letter already)
                replacements.append(self._unpublishable(letter.product, letter.line, letter.frame_id,
                                                        letter.entry_id, letter.source,
                                                        f"{problem} (its dead letter {letter.reason} too)",
                                                        letter.fields, counted=True))
            else:
                self._lost(letter, problem)
        for letter in replacements:
            problem = await self._refusal([], [letter])
            if problem is None:
                kept_dead.append(letter)
            else:
                self._lost(letter, problem)
        return kept_results, kept_dead

    async def _refusal(self, results: list[Result], dead: list[DeadLetter]) -> str | None:
        """Publish one item alone: None when every sink took it, else why (a permanent refusal). A transient
        failure propagates (the caller retries the whole batch; items already written are duplicates at most)."""
        try:
            await self._all(results, dead)
        except Exception as exc:
            if is_transient(exc):
                raise
            return f"{type(exc).__name__}: {exc}"
        return None

    def _unpublishable(self, product: str, line: str, frame_id: str, entry_id: str | None, source: str,
                       problem: str, fields: dict[str, str] | None = None, counted: bool = False) -> DeadLetter:
        """The ``unpublishable`` dead letter replacing a refused item; it keeps the frame's original small fields.
        ``counted``: the item is a dead letter, whose frame inspectd_frames_dead_lettered counted when it was made
        (one count a frame: received = scored + dead-lettered)."""
        self.unpublishable += 1
        safe_line = source_line(source)
        if not counted:
            self.metrics.dead_lettered(product, safe_line or "unknown", Reason.UNPUBLISHABLE)
        log.error("frame %s/%s (line %r) cannot be published: %s; dead-lettered as unpublishable", product,
                  frame_id, line[:80], problem)
        return DeadLetter(reason=Reason.UNPUBLISHABLE, stage="publish", product=safe_text(product), line=safe_line,
                          frame_id=safe_text(frame_id), entry_id=None if entry_id is None else safe_text(entry_id),
                          source=safe_text(source), detail=safe_text(problem[:500]),
                          fields={safe_text(k): safe_text(v) for k, v in (fields or {}).items()})

    def _lost(self, letter: DeadLetter, problem: str) -> None:
        self.metrics.error("unpublishable_dead_letter")
        log.error("dead letter for %s/%s cannot be published either (%s); it is acked and only this log line "
                  "records it", letter.product, letter.frame_id, problem)
