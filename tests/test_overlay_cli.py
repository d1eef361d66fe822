"""`inspectd overlay`: a real frame and its mask become a heat-map PNG of the frame's size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from inspectd.cli import main

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def test_overlay_single_image(tmp_path: Path) -> None:
    image = HAZELNUT / "colour" / "00.png"
    mask = HAZELNUT / "mask" / "colour" / "00.png"
    out = tmp_path / "o.png"
    assert main(["overlay", str(image), "--mask", str(mask), "--out", str(out), "--threshold", "0.5"]) == 0
    from inspectd.streams.overlay import LEGEND_HEIGHT

    rendered = np.asarray(Image.open(out))
    source = np.asarray(Image.open(image).convert("RGB"))
    assert rendered.shape == (source.shape[0] + LEGEND_HEIGHT, *source.shape[1:])  # the frame, then its legend
    rendered = rendered[:source.shape[0]]
    defect = np.asarray(Image.open(mask).convert("L")) > 0
    assert not np.array_equal(rendered[defect], source[defect])  # the heat map is drawn


def test_overlay_from_jsonl_results(tmp_path: Path) -> None:
    record = {"kind": "result", "product": "nut", "frame_id": "00.png", "verdict": "NG", "threshold": 0.5,
              "mask_path": str(HAZELNUT / "mask" / "colour" / "00.png"),
              "meta": {"path": str(HAZELNUT / "colour" / "00.png")}}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(record) + "\n" + json.dumps({"kind": "dead_letter"}) + "\n")
    assert main(["overlay", "--results", str(results), "--out", str(tmp_path / "out")]) == 0
    assert [p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")] == ["nut/00.NG.png"]


def _folder_results(tmp_path: Path, names: list[str], drop_twice: str = "") -> tuple[Path, Path]:
    """Score ``inbox/hazelnut/<name>`` files through a real watched folder (default ``after: move``) into a real
    JSONL sink, then ack them as the daemon does after publishing: the files move to ``inbox/done/``. With
    ``drop_twice``, a second file of that name is dropped and scored after the first moved (it is renamed in done/)."""
    import asyncio

    from inspectd.streams.folder import FolderSource
    from inspectd.streams.jsonl import JsonlSink
    from inspectd.streams.schema import Frame, Result

    inbox = tmp_path / "inbox"
    (inbox / "hazelnut").mkdir(parents=True)
    sink = JsonlSink(tmp_path / "out" / "results.jsonl", mask_dir=tmp_path / "out" / "masks")
    src = FolderSource(inbox, poll_interval_s=0.02, settle_s=0.05, notify=False)
    mask = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)

    async def score(batch: dict[str, Path]) -> None:
        for name, image in batch.items():
            (inbox / "hazelnut" / name).write_bytes(image.read_bytes())
        frames = await src.read(10, timeout_s=3)
        assert len(frames) == len(batch) and all(isinstance(f, Frame) for f in frames)
        await sink.publish_batch([Result(product=f.product, line=f.line, frame_id=f.frame_id, captured_at=f.captured_at,
                                         score=0.9, verdict="NG", threshold=0.5, detector="d", state_version="1",
                                         mask=mask, entry_id=f.entry_id, source=f.source, meta=f.meta)
                                  for f in frames])
        for frame in frames:  # the daemon acks after the batch is published: only now does the file move
            await frame.ack()

    async def go() -> None:
        await score({name: HAZELNUT / "colour" / name for name in names})
        if drop_twice:
            await score({drop_twice: HAZELNUT / "good" / drop_twice})

    asyncio.run(go())
    src.close()
    sink.close()
    assert not list((inbox / "hazelnut").iterdir())  # every file moved to done/
    return inbox, tmp_path / "out" / "results.jsonl"


def test_overlay_finds_frames_a_watched_folder_moved_to_done(tmp_path: Path, capsys) -> None:
    inbox, results = _folder_results(tmp_path, ["00.png", "01.png"], drop_twice="00.png")
    moved = sorted(p.name for p in (inbox / "done" / "hazelnut").iterdir())
    assert len(moved) == 3 and moved[1:] == ["00.png", "01.png"] and moved[0].startswith("00.")  # 00.<ns>.png
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records[0]["meta"]["path"] == str(inbox / "hazelnut" / "00.png")  # where it was scored
    assert records[0]["meta"]["done_path"] == str(inbox / "done" / "hazelnut" / "00.png")  # where it went on ack
    assert main(["overlay", "--results", str(results), "--out", str(tmp_path / "ov")]) == 0
    assert "3 overlay(s)" in capsys.readouterr().out
    drawn = sorted((tmp_path / "ov" / "hazelnut").iterdir())
    assert len(drawn) == 3
    # each overlay is drawn on its own frame: the second 00.png (a good nut, renamed on its way into done/) is not
    # drawn on the first one's pixels, nor the other way round
    pixels = {p.name: np.asarray(Image.open(p)) for p in drawn}
    first, second = (v for k, v in sorted(pixels.items()) if k.startswith("hazelnut_00"))
    assert not np.array_equal(first, second)
    older = tmp_path / "older.jsonl"  # results written before meta.done_path: done/ beside the folder in `source`
    older.write_text("".join(json.dumps({**r, "meta": {"path": r["meta"]["path"]}}) + "\n" for r in records))
    assert main(["overlay", "--results", str(older), "--out", str(tmp_path / "ov-older")]) == 0
    assert {p.name: np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "ov-older" / "hazelnut").iterdir()} \
        == {name: image.tobytes() for name, image in pixels.items()}


def test_overlay_names_results_whose_frame_is_gone_and_carries_on(tmp_path: Path, capsys) -> None:
    inbox, results = _folder_results(tmp_path, ["00.png", "01.png"])
    (inbox / "done" / "hazelnut" / "00.png").unlink()  # cleaned up since
    assert main(["overlay", "--results", str(results), "--out", str(tmp_path / "ov")]) == 0
    captured = capsys.readouterr()
    assert "hazelnut/00.png: skipped: frame file not found" in captured.err, captured.err
    assert "1 overlay(s)" in captured.out and "1 skipped" in captured.out
    assert len(list((tmp_path / "ov").rglob("*.png"))) == 1
    # no frame left at all: each result named, rc 1 (nothing written), never a crash
    (inbox / "done" / "hazelnut" / "01.png").unlink()
    assert main(["overlay", "--results", str(results), "--out", str(tmp_path / "ov2")]) == 1
    assert capsys.readouterr().err.count("skipped: frame file not found") == 2


def test_overlay_after_the_daemon_moved_its_frames(tmp_path: Path) -> None:
    """The reviewer's reproduction: `inspectd run` on a watched folder (default after: move), then overlay."""
    import subprocess
    import sys

    import yaml

    (tmp_path / "inbox" / "hazelnut").mkdir(parents=True)
    for name in ("00.png", "01.png"):
        (tmp_path / "inbox" / "hazelnut" / name).write_bytes((HAZELNUT / "colour" / name).read_bytes())
    out = tmp_path / "out"
    config = {"demo": True, "model": {"arch": "inspectd-tiny", "pretrained": "random", "device": "cpu"},
              "sources": {"redis": False, "folders": [{"path": str(tmp_path / "inbox"), "line": "demo",
                                                        "poll_interval_s": 0.1}]},
              "sinks": {"redis": False, "jsonl": str(out / "results.jsonl"), "jsonl_masks_dir": str(out / "masks")},
              "http": {"port": 0}, "registry": {"state_cache_dir": str(out / "states"), "watch": False},
              "products": [{"id": "hazelnut", "object_name": "hazelnut", "references": str(HAZELNUT / "good"),
                            "shots": 4, "mask": "downscaled:64"}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "inspectd.cli"]
    ran = subprocess.run([*cli, "run", "--config", str(tmp_path / "cfg.yaml"), "--max-frames", "2"],
                         capture_output=True, text=True, timeout=180)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "inbox" / "done" / "hazelnut").iterdir()) == ["00.png", "01.png"]
    drawn = subprocess.run([*cli, "overlay", "--results", str(out / "results.jsonl"), "--out", str(tmp_path / "ov")],
                           capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0 and "2 overlay(s)" in drawn.stdout, drawn.stderr
    assert len(list((tmp_path / "ov" / "hazelnut").glob("*.NG.png")) + list((tmp_path / "ov").rglob("*.OK.png"))) == 2


def test_overlay_skips_torn_and_blank_lines(tmp_path: Path, capsys) -> None:
    record = {"kind": "result", "product": "nut", "frame_id": "00.png", "verdict": "NG", "threshold": 0.5,
              "mask_path": str(HAZELNUT / "mask" / "colour" / "00.png"),
              "meta": {"path": str(HAZELNUT / "colour" / "00.png")}}
    good = json.dumps(record) + "\n"
    torn = tmp_path / "torn.jsonl"  # `(cat results.jsonl; head -c 100 results.jsonl) > torn.jsonl`, a blank line
    torn.write_text(good + "\n" + "   \n" + json.dumps({**record, "frame_id": "01.png"}) + "\n" + good[:100])
    assert main(["overlay", "--results", str(torn), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"{torn}:5: not JSON"], captured.err  # blank lines: silently
    assert "2 overlay(s)" in captured.out and "1 skipped" in captured.out
    assert sorted(p.name for p in (tmp_path / "out" / "nut").iterdir()) == ["00.NG.png", "01.NG.png"]
