"""Publishing to Redis writes each result once: a batch Redis partly refused, or a retry after another sink failed,
does not XADD again the results Redis already took (real Redis, real JSONL sink)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from inspectd.daemon.metrics import Metrics
from inspectd.daemon.publisher import Publisher
from inspectd.streams.jsonl import JsonlSink
from inspectd.streams.reasons import Reason
from inspectd.streams.redis_keys import StreamKeys
from inspectd.streams.redis_sink import RedisResultSink
from inspectd.streams.schema import VERDICT_OK, DeadLetter, Result
from tests.daemon_helpers import read_stream

pytestmark = pytest.mark.redis


def _result(keys: StreamKeys, line: str, n: int) -> Result:
    return Result(product="p", line=line, frame_id=f"{line}-f{n}", captured_at=1.0, score=0.1, verdict=VERDICT_OK,
                  threshold=0.5, detector="winclip", state_version="1", source=f"redis:{keys.frames(line)}",
                  entry_id=f"{n}-0")


async def test_a_batch_redis_partly_refused_is_not_written_twice(redis_client: Any, key_prefix: str) -> None:
    """One line's results key holding a string (WRONGTYPE): the pipeline wrote the batch's other XADDs all the same,
    then the isolation published every item again, one by one: each other result and dead letter appeared twice."""
    keys = StreamKeys(key_prefix)
    await redis_client.set(keys.results("l2"), "not a stream")
    batch = [_result(keys, "l1", 0), _result(keys, "l2", 1), _result(keys, "l1", 2), _result(keys, "l1", 3)]
    dead = [DeadLetter(reason=Reason.CORRUPT_IMAGE, stage="decode", product="p", line="l1", frame_id="bad",
                       entry_id="9-0", source=f"redis:{keys.frames('l1')}")]
    published, letters = await asyncio.wait_for(Publisher([RedisResultSink(redis_client, keys)], Metrics())
                                                .publish(batch, dead), 10)
    assert [r.frame_id for r in published] == ["l1-f0", "l1-f2", "l1-f3"]
    assert sorted((d.frame_id, d.reason) for d in letters) == [("bad", Reason.CORRUPT_IMAGE),
                                                               ("l2-f1", Reason.UNPUBLISHABLE)]
    results = Counter(r["frame_id"] for r in await read_stream(redis_client, keys.results("l1")))
    assert results == {"l1-f0": 1, "l1-f2": 1, "l1-f3": 1}  # (each 2 before)
    assert [d["frame_id"] for d in await read_stream(redis_client, keys.dead("l1"))] == ["bad"]
    [refused] = await read_stream(redis_client, keys.dead("l2"))
    assert refused["reason"] == "unpublishable" and "WRONGTYPE" in refused["detail"]


async def test_a_retry_for_a_failing_jsonl_sink_does_not_duplicate_the_redis_results(
        redis_client: Any, key_prefix: str, tmp_path: Path) -> None:
    """Redis first, then a JSONL file whose folder cannot be made (a full or broken disk: transient, retried): every
    retry XADDed the whole batch to Redis again, one copy of each result per attempt while the disk stayed broken."""
    keys = StreamKeys(key_prefix)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the sink's folder should be")
    jsonl = JsonlSink(blocker / "results.jsonl", fsync=False)
    publisher = Publisher([RedisResultSink(redis_client, keys), jsonl], Metrics())
    batch = [_result(keys, "l1", n) for n in range(5)]
    task = asyncio.create_task(publisher.publish(batch, []))
    await asyncio.sleep(1.0)  # a few retries fail meanwhile (backoff 0.1 s, 0.2 s, 0.4 s ...)
    assert not task.done()
    blocker.unlink()  # the disk is fixed
    published, _ = await asyncio.wait_for(task, 10)
    jsonl.close()
    assert len(published) == 5
    results = Counter(r["frame_id"] for r in await read_stream(redis_client, keys.results("l1")))
    assert results == {f"l1-f{n}": 1 for n in range(5)}  # (each once per attempt before)
    assert len((blocker / "results.jsonl").read_text().splitlines()) == 5


async def test_a_refused_dead_letter_replaced_as_unpublishable_is_counted_once(redis_client: Any,
                                                                               key_prefix: str) -> None:
    """A dead letter is counted when it is made; its unpublishable replacement counted the frame a second time, so
    inspectd_frames_dead_lettered exceeded the frames refused (received != scored + dead-lettered)."""
    from prometheus_client.parser import text_string_to_metric_families

    keys = StreamKeys(key_prefix)
    await redis_client.set(keys.dead("l2"), "not a stream")
    metrics = Metrics()
    letter = DeadLetter(reason=Reason.BAD_LINE, stage="parse", product="p", line="l2", frame_id="misrouted",
                        entry_id="9-0", source=f"redis:{keys.frames('l1')}")  # names line l2, came in on l1
    _, letters = await asyncio.wait_for(Publisher([RedisResultSink(redis_client, keys)], metrics).publish([], [letter]),
                                        10)
    assert [(d.frame_id, d.reason, d.line) for d in letters] == [("misrouted", Reason.UNPUBLISHABLE, "l1")]
    [replacement] = await read_stream(redis_client, keys.dead("l1"))
    assert replacement["frame_id"] == "misrouted"
    counted = [s.value for f in text_string_to_metric_families(metrics.exposition().decode())
               for s in f.samples if s.name == "inspectd_frames_dead_lettered_total"]
    assert sum(counted) == 0  # the daemon counted it when it made the bad_line dead letter (was 1 more here)
