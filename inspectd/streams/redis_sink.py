"""Redis Streams sinks: results (with the mask PNG per product policy) and dead letters, XADDed with
approximate MAXLEN trimming; ``publish_batch`` writes a whole batch in one pipelined round trip."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from inspectd.streams.records import (
    MaskPolicies,
    MaskPolicy,
    check_mask_bits,
    dead_letter_record,
    encode_result_mask,
    policy_for,
    result_record,
)
from inspectd.streams.redis_keys import StreamKeys
from inspectd.streams.schema import DeadLetter, Result

Fields = dict[str, bytes | str]
DEFAULT_LINE = "unknown"


def _json(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as UTF-8 (not escaped)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def result_fields(result: Result, policy: MaskPolicy, mask_bits: int = 8) -> Fields:
    """XADD fields of one result (``spec/streams.asyncapi.yaml``, message ``Result``); ``mask`` (PNG bytes,
    ``mask_bits`` per pixel) only when one is published; ``meta`` byte for byte as the frame sent it."""
    rec = result_record(result, mask_bits)
    png, note = encode_result_mask(result, policy, mask_bits)
    fields: Fields = {
        "product": rec["product"],
        "line": rec["line"],
        "frame_id": rec["frame_id"],
        "entry_id": rec["entry_id"],
        "ts": repr(float(rec["ts"])),
        "score": repr(rec["score"]),
        "verdict": rec["verdict"],
        "threshold": repr(rec["threshold"]),
        "detector": rec["detector"],
        "state_version": rec["state_version"],
        "timings": _json(rec["timings"]),
        "mask_note": note,
        "demo_weights": "1" if rec["demo_weights"] else "0",
        "mask_scale": repr(rec["mask_scale"]),
        "mask_bits": str(rec["mask_bits"]),
        "mask_threshold": repr(rec["mask_threshold"]),
        "source": rec["source"],
        "meta": result.meta_raw if result.meta_raw is not None else _json(rec["meta"]),
    }
    if png is not None:
        fields["mask"] = png
    return fields


def dead_letter_fields(dead: DeadLetter, field_limit: int = 512) -> Fields:
    """XADD fields of one dead letter (message ``DeadLetter`` of the spec): ids, reason, stage, detail and the
    original small fields as one JSON object (``fields``)."""
    rec = dead_letter_record(dead, field_limit)
    fields: Fields = {k: v for k, v in rec.items() if k != "fields"}
    fields["fields"] = _json(rec["fields"])
    return fields


class DeadLetterSink:
    """XADDs dead letters to ``keys.dead(line)`` (or one fixed ``stream``), trimmed to ~``maxlen``."""

    def __init__(self, client: Any, keys: StreamKeys | None = None, *, stream: str | None = None,
                 maxlen: int = 10_000, field_limit: int = 512) -> None:
        self.client = client
        self.keys = keys or StreamKeys()
        self.stream = stream
        self.maxlen = maxlen
        self.field_limit = field_limit

    def key_for(self, dead: DeadLetter) -> str:
        return self.stream or self.keys.dead(dead.line or DEFAULT_LINE)

    def add_to(self, pipe: Any, dead_letters: Sequence[DeadLetter]) -> None:
        for dead in dead_letters:
            pipe.xadd(self.key_for(dead), dead_letter_fields(dead, self.field_limit),
                      maxlen=self.maxlen, approximate=True)

    async def publish(self, dead_letters: Sequence[DeadLetter]) -> list[str]:
        """XADD all in one round trip; returns the new entry ids."""
        pipe = self.client.pipeline(transaction=False)
        self.add_to(pipe, dead_letters)
        if not dead_letters:
            return []
        replies = await _execute(pipe, raise_on_error=False)
        _raise_refusal(dead_letters, replies)
        return [_id(x) for x in replies]


class RedisResultSink:
    """XADDs results to ``keys.results(line)`` (or one fixed ``stream``), trimmed to ~``maxlen``.

    ``mask_policy`` maps product -> MaskPolicy (a mapping, or a callable), ``default_mask_policy`` covers
    the rest; ``mask_bits`` (8 or 16, ``sinks.mask_bits``) is the masks' bit depth.
    ``publish_batch`` returns only after Redis confirmed every XADD: ack the inputs then.
    """

    def __init__(
        self,
        client: Any,
        keys: StreamKeys | None = None,
        *,
        stream: str | None = None,
        maxlen: int = 100_000,
        mask_policy: MaskPolicies = None,
        default_mask_policy: MaskPolicy | None = None,
        dead_letters: DeadLetterSink | None = None,
        mask_bits: int = 8,
    ) -> None:
        self.client = client
        self.mask_bits = check_mask_bits(mask_bits)
        self.keys = keys or StreamKeys()
        self.stream = stream
        self.maxlen = maxlen
        self._policy = mask_policy
        self.default_mask_policy = default_mask_policy or MaskPolicy()
        self.dead_letters = dead_letters or DeadLetterSink(client, self.keys)

    def policy_for(self, product: str) -> MaskPolicy:
        return policy_for(self._policy, product, self.default_mask_policy)

    def key_for(self, result: Result) -> str:
        return self.stream or self.keys.results(result.line or DEFAULT_LINE)

    def encode(self, results: Sequence[Result]) -> list[Fields]:
        """Field dicts for the batch (CPU: PNG encoding; ``publish_batch`` runs it in a thread)."""
        return [result_fields(r, self.policy_for(r.product), self.mask_bits) for r in results]

    async def publish_batch(self, results: Sequence[Result], dead_letters: Sequence[DeadLetter] = ()
                            ) -> list[str]:
        """XADD the batch's results and dead letters in one pipelined round trip; the new entry ids.

        Raises when Redis refused any of them; nothing is acked by this call. A refusal of some XADDs (the others
        were written) raises the first refusal with ``published``, the items Redis did write, so that a retry
        or the publisher's item-by-item isolation does not write those a second time.
        """
        if not results and not dead_letters:
            return []
        needs_thread = any(r.mask is not None for r in results)
        encoded = await asyncio.to_thread(self.encode, results) if needs_thread else self.encode(results)
        pipe = self.client.pipeline(transaction=False)
        for result, fields in zip(results, encoded, strict=True):
            pipe.xadd(self.key_for(result), fields, maxlen=self.maxlen, approximate=True)
        self.dead_letters.add_to(pipe, dead_letters)
        replies = await _execute(pipe, raise_on_error=False)
        _raise_refusal([*results, *dead_letters], replies)
        return [_id(x) for x in replies]

    async def publish(self, results: Sequence[Result]) -> list[str]:
        return await self.publish_batch(results, ())


def _raise_refusal(items: Sequence[Result | DeadLetter], replies: Sequence[Any]) -> None:
    """Raise the first refused XADD of a non-transactional pipeline (the XADDs after it ran all the same), its
    ``published`` naming the items that were written."""
    refused = [reply for reply in replies if isinstance(reply, Exception)]
    if refused:
        refused[0].published = [item for item, reply in zip(items, replies, strict=True)
                                if not isinstance(reply, Exception)]
        raise refused[0]


async def _execute(pipe: Any, raise_on_error: bool = True) -> list[Any]:
    """``pipe.execute()``. redis-py's cluster client, when one node's connection fails, closes the connections of
    every node (to rediscover the topology) even while other tasks use them; a pipeline caught mid-write then fails
    with ``AttributeError: 'NoneType' object has no attribute ...`` (its reader/writer is gone). That is a lost
    connection: raised as one, so the publisher retries it (transient) instead of dead-lettering the batch."""
    try:
        return await pipe.execute(raise_on_error=raise_on_error)
    except AttributeError as exc:
        if "'NoneType' object has no attribute" not in str(exc):
            raise
        raise RedisConnectionError(f"connection closed during the pipeline ({exc})") from exc


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
