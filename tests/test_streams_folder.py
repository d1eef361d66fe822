"""Folder source: new files picked up once stable, temp names ignored, restarts do not rescore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from inspectd.streams.codec import decode_frame_image
from inspectd.streams.folder import FolderSource
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
