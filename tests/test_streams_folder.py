"""Folder source: new files picked up once stable, temp names ignored, restarts do not rescore."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.streams.codec import decode_frame_image
from inspectd.streams.folder import FolderSource, Item
from inspectd.streams.jsonl import JsonlSink
from inspectd.streams.records import MaskPolicy
from inspectd.streams.schema import DeadLetter, Frame, Result

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut" / "good"
POLL = 0.03


def _copy(name: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HAZELNUT / name, dest)
    return dest


async def test_new_files_picked_up_with_product_from_subfolder(tmp_path: Path) -> None:
    src = FolderSource(tmp_path, line="l9", poll_interval_s=POLL)
    assert await src.read(10) == []
    _copy("01.png", tmp_path / "hazelnut" / "a.png")
    _copy("02.png", tmp_path / "stray.png")  # no product folder, none configured
    (tmp_path / "hazelnut" / "notes.txt").write_text("not an image")
    items = await src.read(10, timeout_s=2)
    by_id = {i.frame_id: i for i in items}
    assert set(by_id) == {"hazelnut/a.png", "stray.png"}
    frame = by_id["hazelnut/a.png"]
    assert isinstance(frame, Frame) and (frame.product, frame.line) == ("hazelnut", "l9")
    np.testing.assert_array_equal(decode_frame_image(frame), np.asarray(Image.open(HAZELNUT / "01.png")))
    stray = by_id["stray.png"]
    assert isinstance(stray, DeadLetter) and stray.reason == "no_product"
    assert await src.read(10) == []  # in flight: not emitted twice
    await frame.ack()
    await stray.ack()
    assert (tmp_path / "done" / "hazelnut" / "a.png").exists()
    assert (tmp_path / "failed" / "stray.png").exists()
    assert not (tmp_path / "hazelnut" / "a.png").exists()


async def test_half_written_and_temp_files_wait(tmp_path: Path) -> None:
    import time

    src = FolderSource(tmp_path, product="hazelnut", poll_interval_s=POLL, settle_s=0.3)
    data = (HAZELNUT / "03.png").read_bytes()
    growing = tmp_path / "g.png"
    growing.write_bytes(data[:1000])
    (tmp_path / "h.png.part").write_bytes(data)
    (tmp_path / ".hidden.png").write_bytes(data)
    for chunk_end in (5000, 20000, len(data)):
        assert src.scan() == []  # changed since the last poll: not stable yet
        with growing.open("ab") as fh:
            fh.write(data[growing.stat().st_size:chunk_end])
    assert src.scan() == []  # last write seen for the first time
    assert src.scan() == []  # unchanged across two polls is not enough: they can be 10 ms apart
    time.sleep(0.35)
    assert src.scan() == [growing]  # unchanged for settle_s
    (tmp_path / "h.png.part").rename(tmp_path / "h.png")  # the writer's atomic rename
    items = await src.read(10, timeout_s=2)
    assert [i.frame_id for i in items] == ["g.png"]  # h.png has only just appeared
    assert items[0].payload == data
    assert [i.frame_id for i in await src.read(10, timeout_s=2)] == ["h.png"]


async def test_restart_does_not_rescore_moved_or_recorded(tmp_path: Path) -> None:
    for after in ("move", "record"):
        root = tmp_path / after
        _copy("04.png", root / "p" / "x.png")
        _copy("05.png", root / "p" / "y.png")
        src = FolderSource(root, after=after, poll_interval_s=POLL)
        items = await src.read(10, timeout_s=2)
        assert len(items) == 2
        await items[0].ack()  # y.png is never acked: the process "crashes"
        again = FolderSource(root, after=after, poll_interval_s=POLL)
        items2 = await again.read(10, timeout_s=2)
        assert [i.frame_id for i in items2] == [items[1].frame_id], after
        await items2[0].ack()
        third = FolderSource(root, after=after, poll_interval_s=POLL)
        assert await third.read(10, timeout_s=0.2) == [], after
    assert json.loads((tmp_path / "record" / ".inspectd-processed.jsonl").read_text().splitlines()[0])["path"]


async def test_jsonl_sink_writes_records_and_mask_files(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "out" / "results.jsonl", mask_dir=tmp_path / "masks",
                     default_mask_policy=MaskPolicy.parse("downscaled:32"))
    mask = np.zeros((64, 64), np.float32)
    results = [Result(product="p", line="l", frame_id=f"a/b{i}.png", captured_at=1.0, score=0.9, verdict="NG",
                      threshold=0.5, detector="d", state_version="v", mask=mask if i == 0 else None,
                      entry_id=f"{i}-0") for i in range(2)]
    dead = [DeadLetter(reason="corrupt_image", stage="decode", frame_id="z", fields={"k": "v" * 5000})]
    assert await sink.publish_batch(results, dead) == 3
    assert await sink.publish_batch(results[1:]) == 1
    sink.close()
    lines = [json.loads(t) for t in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["result", "result", "dead_letter", "result"]
    first = lines[0]
    assert first["verdict"] == "NG" and first["score"] == 0.9 and "mask_path" not in lines[1]
    assert Image.open(first["mask_path"]).size == (32, 32)
    assert Path(first["mask_path"]).parent == tmp_path / "masks" / "p"
    assert lines[2]["reason"] == "corrupt_image" and len(lines[2]["fields"]["k"]) == 512


async def test_a_reader_of_the_mask_folder_never_sees_half_a_mask_file(tmp_path: Path) -> None:
    """A retried publish rewrites its own mask file; a consumer watching the folder reads it meanwhile."""
    import threading

    sink = JsonlSink(tmp_path / "results.jsonl", mask_dir=tmp_path / "masks", fsync=False, mask_bits=16,
                     default_mask_policy=MaskPolicy.parse("full"))
    mask = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)  # incompressible: a ~2 MB PNG
    result = Result(product="p", line="l", frame_id="f.png", captured_at=1.0, score=0.9, verdict="NG", threshold=0.5,
                    detector="d", state_version="v", mask=mask, entry_id="1-0")
    await sink.publish_batch([result])
    path = tmp_path / "masks" / "p" / "f_1-0.mask.png"
    whole = path.read_bytes()
    seen, stop = [], threading.Event()

    def read_all_the_time() -> None:
        while not stop.is_set():
            seen.append(len(path.read_bytes()))

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for _ in range(8):
            await sink.publish_batch([result])
    finally:
        stop.set()
        reader.join()
    sink.close()
    assert len(seen) > 8 and set(seen) == {len(whole)}, sorted(set(seen))[:5]


def _png(value: int = 9) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path (symlinked folders not followed)."""
    return {(Path(d) / n).relative_to(folder).as_posix(): (Path(d) / n).read_bytes()
            for d, _dirs, names in os.walk(folder) for n in names}


async def _drain(src: FolderSource, want: set[str], extra_s: float = 0.6, limit_s: float = 6.0) -> dict[str, Item]:
    """Read and ack until every id in ``want`` came, then go on polling ``extra_s`` for anything else."""
    got: dict[str, Item] = {}
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for item in await src.read(16, timeout_s=POLL):
            got[item.frame_id] = item
            assert item.ack is not None
            await item.ack()
        if want <= got.keys():
            deadline = min(deadline, time.monotonic() + extra_s)
    return got


@pytest.mark.parametrize("notify", [False, True])
async def test_linked_hidden_and_image_named_folders_alike_with_and_without_notify(
        tmp_path: Path, notify: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Change events come from inside symlinked (inotify follows them) and hidden folders too: they must be left
    out as a full walk leaves them out, and nothing outside the root may ever be moved into done/."""
    caplog.set_level(logging.INFO, logger="inspectd.streams.folder")
    root, outside, other = tmp_path / "watched", tmp_path / "outside", tmp_path / "other_line"
    (root / "nut").mkdir(parents=True)
    outside.mkdir()
    other.mkdir()
    (outside / "secret.png").write_bytes(_png(1))
    (root / "early").symlink_to(other, target_is_directory=True)  # linked before the start
    src = FolderSource(root, poll_interval_s=POLL, settle_s=0.05, notify=notify, rescan_s=3600)
    try:
        assert await src.read(8, timeout_s=POLL) == []  # the first (full) walk; starts the watcher
        await asyncio.sleep(0.3)
        (other / "a.png").write_bytes(_png(2))  # another process writes into its own folder (early's target)
        (root / "linked").symlink_to(outside, target_is_directory=True)  # linked after the start
        (root / "nut" / "link.png").symlink_to(outside / "secret.png")  # a linked file: read through the link
        (root / "nut" / "loop.png").symlink_to("loop.png")  # a link loop: a broken link
        (root / ".cache" / "nut").mkdir(parents=True)
        (root / ".cache" / "nut" / "h.png").write_bytes(_png(3))
        (root / "nut" / "x.png").mkdir()  # a folder with an image name
        (root / "nut" / "x.png" / "inner.png").write_bytes(_png(4))
        await asyncio.sleep(0.2)
        (other / "b.png").write_bytes(_png(5))
        (outside / "c.png").write_bytes(_png(6))
        got = await _drain(src, {"nut/link.png", "nut/x.png/inner.png"})
        if notify:  # the change events did the work (no fallback to full walks)
            assert src.notify and src.full_walks == 1
    finally:
        src.close()
    assert sorted(got) == ["nut/link.png", "nut/x.png/inner.png"]
    assert all(isinstance(item, Frame) for item in got.values())
    assert got["nut/link.png"].payload == _png(1)
    assert _files(outside) == {"secret.png": _png(1), "c.png": _png(6)}  # nothing outside the root moved
    assert _files(other) == {"a.png": _png(2), "b.png": _png(5)}
    assert (root / "done" / "nut" / "link.png").is_symlink()  # the link moved, not its target
    assert (root / "done" / "nut" / "x.png" / "inner.png").read_bytes() == _png(4)
    assert not (root / "failed").exists()
    assert (root / ".cache" / "nut" / "h.png").exists() and (root / "nut" / "loop.png").is_symlink()
    linked = [r.getMessage() for r in caplog.records if "symlinked folder and is not followed" in r.getMessage()]
    assert sorted(m.split(": ")[1].split(" is ")[0] for m in linked) == [str(root / "early"), str(root / "linked")]


async def test_folder_swapped_for_a_link_after_the_read_is_not_moved_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "watched", tmp_path / "outside"
    (root / "nut").mkdir(parents=True)
    (root / "nut" / "a.png").write_bytes(_png(1))
    src = FolderSource(root, poll_interval_s=POLL, settle_s=0.05, notify=False)
    [frame] = await src.read(4, timeout_s=2)
    (root / "nut").rename(tmp_path / "away")
    outside.mkdir()
    (outside / "a.png").write_bytes(_png(2))
    (root / "nut").symlink_to(outside, target_is_directory=True)
    assert frame.ack is not None
    await frame.ack()
    assert _files(outside) == {"a.png": _png(2)}
    assert not (root / "done").exists()


async def test_waiting_file_whose_folder_becomes_a_link_is_dropped(tmp_path: Path) -> None:
    root, outside = tmp_path / "watched", tmp_path / "outside"
    (root / "nut").mkdir(parents=True)
    outside.mkdir()
    src = FolderSource(root, poll_interval_s=POLL, settle_s=0.3, notify=True, rescan_s=3600)
    try:
        assert src.scan() == []  # full walk, watcher started
        await asyncio.sleep(0.3)
        (root / "nut" / "a.png").write_bytes(_png(1))
        await asyncio.sleep(0.2)
        assert src.scan() == []  # seen, waiting to settle
        (root / "nut").rename(tmp_path / "away")
        (outside / "a.png").write_bytes(_png(2))
        (root / "nut").symlink_to(outside, target_is_directory=True)
        got = await _drain(src, set(), extra_s=1.0)
        assert src.notify and src.full_walks == 1
    finally:
        src.close()
    assert got == {}
    assert _files(outside) == {"a.png": _png(2)}


@pytest.mark.parametrize("after", ["move", "record"])
async def test_non_utf8_file_name_is_published_and_kept_under_its_real_name(tmp_path: Path, after: str) -> None:
    """A Latin-1 name (``Pr\xfcfteil.png`` from an old PC or a share) gives ids every sink can encode; the
    file itself is moved (or recorded) under its real name."""
    root = tmp_path / "watched"
    (root / "nut").mkdir(parents=True)
    raw = os.path.join(os.fsencode(root / "nut"), b"Pr\xfcfteil.png")
    with open(raw, "wb") as fh:
        fh.write(_png())
    src = FolderSource(root, after=after, poll_interval_s=POLL, settle_s=0.05, notify=False)
    [frame] = await src.read(4, timeout_s=2)
    assert isinstance(frame, Frame) and frame.payload == _png()
    assert frame.frame_id == frame.entry_id == "nut/Pr\\xfcfteil.png"
    for text in (frame.frame_id, frame.entry_id, frame.source, frame.meta["path"]):
        text.encode("utf-8")  # what the Redis client does (strict)
    sink = JsonlSink(tmp_path / "out" / "results.jsonl", mask_dir=tmp_path / "masks")
    result = Result(product=frame.product, line=frame.line, frame_id=frame.frame_id, captured_at=frame.captured_at,
                    score=0.9, verdict="NG", threshold=0.5, detector="d", state_version="v", entry_id=frame.entry_id,
                    source=frame.source, meta=frame.meta, mask=np.zeros((8, 8), np.float32))
    assert await sink.publish_batch([result]) == 1
    sink.close()
    [record] = [json.loads(t) for t in (tmp_path / "out" / "results.jsonl").read_text("utf-8").splitlines()]
    assert record["frame_id"] == "nut/Pr\\xfcfteil.png"
    assert record["meta"]["path"] == str(root / "nut" / "Pr\\xfcfteil.png")
    assert Path(record["mask_path"]).is_file()
    assert frame.ack is not None
    await frame.ack()
    if after == "move":
        assert os.listdir(os.fsencode(root / "done" / "nut")) == [b"Pr\xfcfteil.png"]
        assert not os.path.exists(raw)
    else:
        assert os.path.exists(raw)
        again = FolderSource(root, after=after, poll_interval_s=POLL, settle_s=0.05, notify=False)
        assert await again.read(4, timeout_s=0.2) == []  # the ledger holds the real name


async def test_change_notification_comes_back_after_a_name_it_cannot_decode(tmp_path: Path) -> None:
    """watchfiles raises on a file name that is not UTF-8; the source then turned notification off for good and
    walked every file at every poll (0.47 CPU s/s at 10 000 files instead of 0.004). It now walks only until the
    notification has restarted."""
    root = tmp_path / "watched"
    (root / "nut").mkdir(parents=True)
    src = FolderSource(root, after="record", poll_interval_s=POLL, settle_s=0.05, notify=True, rescan_s=3600)
    try:
        assert await src.read(4, timeout_s=0.3) == []
        with open(os.path.join(os.fsencode(root / "nut"), b"Pr\xfcfteil.png"), "wb") as fh:
            fh.write(_png())
        [frame] = await src.read(4, timeout_s=5)
        await frame.ack()
        await asyncio.sleep(1.5)  # the failure, and the restart 0.5 s after it
        assert src.notify
        (root / "nut" / "next.png").write_bytes(_png())
        [after] = await src.read(4, timeout_s=5)
        assert after.frame_id == "nut/next.png"
        walks = src.full_walks
        await asyncio.sleep(20 * POLL)
        assert await src.read(4, timeout_s=0.1) == []
        assert src.full_walks <= walks + 1  # polls go by notification again, not a walk each
        assert src.watch_failures >= 1  # (it did fail: the name reached watchfiles)
    finally:
        src.close()


async def test_frames_say_where_their_file_goes_on_ack(tmp_path: Path) -> None:
    """meta.done_path: where ack moves the file; meta.path stays where it was scored. The source's own dead letters
    (moved to failed/) have none, nor frames with after: record (the file stays put)."""
    src = FolderSource(tmp_path / "in", poll_interval_s=POLL, done_dir=tmp_path / "archive")
    _copy("01.png", tmp_path / "in" / "nut" / "a.png")
    _copy("02.png", tmp_path / "in" / "stray.png")  # no product: a dead letter
    items = {i.frame_id: i for i in await src.read(10, timeout_s=2)}
    frame, stray = items["nut/a.png"], items["stray.png"]
    assert frame.meta == {"path": str(tmp_path / "in" / "nut" / "a.png"),
                          "done_path": str(tmp_path / "archive" / "nut" / "a.png")}
    assert json.loads(stray.fields["meta"]) == {"path": str(tmp_path / "in" / "stray.png")}
    await frame.ack()
    await stray.ack()
    assert Path(frame.meta["done_path"]).is_file() and (tmp_path / "in" / "failed" / "stray.png").is_file()
    src.close()
    kept = FolderSource(tmp_path / "kept", after="record", poll_interval_s=POLL)
    _copy("01.png", tmp_path / "kept" / "nut" / "a.png")
    (frame,) = await kept.read(10, timeout_s=2)
    assert frame.meta == {"path": str(tmp_path / "kept" / "nut" / "a.png")}
    kept.close()
