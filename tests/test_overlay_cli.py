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
