"""The edges a plant's file drop meets first: half-written files are never scored, a torn JSONL line never
swallows the next result, and mask files never collide."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inspectd.streams.folder import FolderSource
from inspectd.streams.jsonl import JsonlSink
from inspectd.streams.schema import Frame, Result


def big_png() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_file_written_slowly_is_taken_only_once_complete(tmp_path: Path) -> None:
    data = big_png()
    (tmp_path / "nut").mkdir()
    target = tmp_path / "nut" / "slow.png"
    source = FolderSource(tmp_path, poll_interval_s=0.02, settle_s=0.4)
    done = threading.Event()

    def writer() -> None:  # 64 KB chunks over ~2 s, as a camera PC copying over the network would
        with open(target, "wb") as handle:
            for start in range(0, len(data), 64 * 1024):
                handle.write(data[start:start + 64 * 1024])
                handle.flush()
                time.sleep(2.0 / (len(data) / (64 * 1024)))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    items = []
    deadline = time.monotonic() + 15
    while not items and time.monotonic() < deadline:
        items = await source.read(4, timeout_s=0.02)  # polls back to back: ~20 ms apart
        if items:
            assert done.is_set(), "a half-written file was taken"
    thread.join()
    assert len(items) == 1 and isinstance(items[0], Frame)
    assert items[0].payload == data  # the whole file


def result(frame_id: str, entry_id: str = "") -> Result:
    return Result(product="nut", line="l", frame_id=frame_id, captured_at=1.0, score=0.5, verdict="NG",
                  threshold=0.4, detector="winclip", state_version="1", entry_id=entry_id,
                  mask=np.full((4, 4), 0.5, np.float32))


def test_a_torn_last_line_never_swallows_the_next_result(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    first = JsonlSink(path)
    first.write_batch([result("a")])
    first.close()
    with open(path, "a") as handle:  # kill -9 in the middle of writing a record
        handle.write('{"kind": "result", "frame_id": "torn-')
    again = JsonlSink(path)
    again.write_batch([result("b")])
    again.close()
    lines = path.read_text().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    assert [p["frame_id"] for p in parsed] == ["a", "b"]  # b is intact on its own line


def test_mask_files_of_similar_names_never_collide(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl", mask_dir=tmp_path / "masks")
    sink.write_batch([result("a/x.png"), result("a_x.png"), result("a x.png"), result("plain.png")])
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    paths = [r["mask_path"] for r in records]
    assert len(set(paths)) == 4 and all(Path(p).is_file() for p in paths)
    assert Path(paths[3]).name == "plain.mask.png"  # readable where nothing needed sanitising


def test_a_file_dropped_again_under_its_name_keeps_its_first_mask(tmp_path: Path) -> None:
    """A watched folder's frame id is its file name and so is its entry id: the second frame of one name used to
    overwrite the first one's mask, both records pointing at one file. A Redis frame scored again (at-least-once)
    has its own entry id and rewrites its own mask."""
    sink = JsonlSink(tmp_path / "r.jsonl", mask_dir=tmp_path / "masks")
    first, second = result("nut/00.png", "nut/00.png"), result("nut/00.png", "nut/00.png")
    second.mask, second.captured_at = np.full((4, 4), 0.9, np.float32), 2.0  # the file's new mtime
    sink.write_batch([first])
    sink.write_batch([first])  # a publish retried (another sink failed): its own file again
    sink.write_batch([second])
    sink.write_batch([second])
    sink.write_batch([result("f1", "1-0"), result("f1", "1-0")])  # a redelivered Redis entry
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    folder, redis = [r["mask_path"] for r in records[:4]], [r["mask_path"] for r in records[4:]]
    assert folder[0] == folder[1] != folder[2] == folder[3] and all(Path(p).is_file() for p in folder)
    assert Path(folder[0]).read_bytes() != Path(folder[2]).read_bytes()  # each its own frame's mask
    assert redis[0] == redis[1] and len(list((tmp_path / "masks" / "nut").iterdir())) == 3


def test_records_are_flushed_per_batch(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl")
    asyncio.run(sink.publish_batch([result("x")]))
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])["frame_id"] == "x"
    sink.close()


async def test_an_unwritable_ledger_never_makes_a_file_be_picked_again_and_says_so(tmp_path: Path, caplog) -> None:
    (tmp_path / "nut").mkdir()
    (tmp_path / "nut" / "a.png").write_bytes(_small_png())
    ledger_dir = tmp_path / "ro"
    ledger_dir.mkdir()
    ledger = ledger_dir / "ledger.jsonl"
    ledger.mkdir()  # a folder where the ledger file should be: every write fails (as on a read-only mount)
    source = FolderSource(tmp_path, after="record", ledger=ledger, poll_interval_s=0.02, settle_s=0.05)
    picks = []
    caplog.set_level("ERROR", logger="inspectd.streams.folder")
    for _ in range(6):
        for item in await source.read(4, timeout_s=0.2):
            picks.append(item.frame_id)
            await item.ack()
    assert picks == ["nut/a.png"]  # once, not on every poll
    assert source.finish_errors == 1
    assert any("WILL BE SCORED AGAIN after a restart" in r.getMessage() for r in caplog.records)


def _small_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_files_that_are_skipped_say_why_once(tmp_path: Path, caplog) -> None:
    (tmp_path / "nut").mkdir()
    (tmp_path / "nut" / "empty.png").write_bytes(b"")
    (tmp_path / "nut" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere, target_is_directory=True)
    caplog.set_level("INFO", logger="inspectd.streams.folder")
    source = FolderSource(tmp_path, poll_interval_s=0.02, settle_s=0.0)
    for _ in range(5):
        assert await source.read(4, timeout_s=0.05) == []
    messages = [r.getMessage() for r in caplog.records]
    for words in ("empty (0 bytes)", "broken link", "symlinked folder"):
        assert sum(words in m for m in messages) == 1, (words, messages)  # said once, not on every poll


async def test_with_change_notification_a_poll_does_not_walk_every_processed_file(tmp_path: Path) -> None:
    """10 000 files scored and recorded used to cost a stat each per poll (74 % of a core idle); with change
    notification a poll looks at changed paths and waiting files only, and still finds new and rewritten ones."""
    (tmp_path / "nut").mkdir()
    for i in range(300):
        (tmp_path / "nut" / f"{i:04d}.png").write_bytes(_small_png())
    source = FolderSource(tmp_path, after="record", poll_interval_s=0.02, settle_s=0.05, rescan_s=3600)
    try:
        taken = 0
        deadline = time.monotonic() + 30
        while taken < 300 and time.monotonic() < deadline:
            for item in await source.read(64, timeout_s=0.1):
                await item.ack()
                taken += 1
        assert taken == 300
        for _ in range(10):  # let the notifications of the last ledger writes drain: idle from here on
            await source.read(8, timeout_s=0.05)
        walks = source.full_walks
        stats = {"n": 0}
        original = Path.stat

        def counting(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            stats["n"] += 1
            return original(self, *a, **k)

        Path.stat = counting  # type: ignore[method-assign]
        try:
            for _ in range(20):
                assert await source.read(8, timeout_s=0.01) == []
            idle_stats = stats["n"]
            (tmp_path / "nut" / "new.png").write_bytes(_small_png())
            (tmp_path / "nut" / "0007.png").write_bytes(_small_png() + b"\0")  # rewritten in place
            found: list[str] = []
            deadline = time.monotonic() + 10
            while len(found) < 2 and time.monotonic() < deadline:
                found += [i.frame_id for i in await source.read(8, timeout_s=0.05)]
        finally:
            Path.stat = original  # type: ignore[method-assign]
        assert source.full_walks == walks  # no full walk while idle
        assert idle_stats < 20  # not 20 polls x 300 files
        assert sorted(found) == ["nut/0007.png", "nut/new.png"]
    finally:
        source.close()
