"""Offline eval on messy data: bad files are skipped and named, finished cells survive a later failure, masks
of another size are reported, soft masks binarise at a threshold, and tables carry the dataset's own name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from inspectd.cli import main
from inspectd.detectors.data.datasets import load_mask

TOY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def messy_dataset(root: Path) -> Path:
    """A folder-layout dataset built from the shared hazelnut images, plus the mistakes real data has."""
    data = root / "messy-nuts"
    cat = data / "hazelnut"
    for sub in ("good", "bad", "masks"):
        (cat / sub).mkdir(parents=True)
    for i, src in enumerate(sorted((TOY / "good").glob("*.png"))[:8]):
        shutil.copy(src, cat / "good" / f"{i:02d}.png")
    for i, src in enumerate(sorted((TOY / "colour").glob("*.png"))[:4]):
        shutil.copy(src, cat / "bad" / f"{i:02d}.png")
        mask = np.asarray(Image.open(TOY / "mask" / "colour" / src.name).convert("L"))
        size = (mask.shape[1] // 2, mask.shape[0] // 2) if i == 0 else (mask.shape[1], mask.shape[0])
        Image.fromarray(mask).resize(size, Image.Resampling.NEAREST).save(cat / "masks" / f"{i:02d}.png")
    (cat / "bad" / "notes.png").write_text("this is not an image")  # a text file with an image name
    good = (cat / "bad" / "01.png").read_bytes()
    (cat / "bad" / "trunc.png").write_bytes(good[: len(good) // 3])  # truncated: header fine, pixels missing
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(cat / "masks" / "trunc.png")
    return data


def test_messy_data_is_skipped_named_and_counted_and_nothing_finished_is_lost(tiny_checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    data = messy_dataset(tmp_path)
    out = tmp_path / "out"
    args = ["eval", "--dataset", "folder", "--root", str(data), "--arch", "inspectd-tiny", "--weights",
            str(tiny_checkpoint), "--shots", "0", "1", "50", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--eval-size", "64"]
    assert main(args) == 0
    zero = json.loads((out / "winclip_0shot.json").read_text())
    assert zero["title"].startswith("winclip 0-shot on messy-nuts")  # the dataset's name, not "dataset"
    notes = " | ".join(zero["notes"])
    assert "notes.png" in notes and "no readable image" in notes  # refused by the reader, named
    assert "trunc.png" in notes and "unreadable test image" in notes  # failed to decode: skipped, named
    assert "00.png" in notes and "another size" in notes
    rows = {(r["category"], r["metric"]): r["mean"] for r in zero["results"]}
    assert rows[("hazelnut", "pixel_auroc")] is not None  # the bad files did not switch pixel metrics off
    assert (out / "winclip_1shot.json").is_file()
    assert not (out / "winclip_50shot.json").exists()  # 50 references do not exist: skipped, not a crash


def test_soft_mask_borders_are_not_regions(tmp_path: Path) -> None:
    soft = np.zeros((10, 10), np.uint8)
    soft[2:5, 2:5] = 255
    soft[1, 1:6] = 40  # JPEG-ish grey halo
    Image.fromarray(soft).save(tmp_path / "soft.png")
    mask = load_mask(tmp_path / "soft.png")
    assert mask.sum() == 9 and not mask[1].any()
    labels = np.zeros((10, 10), np.uint8)
    labels[0:2, 0:2] = 2  # label-valued masks (VisA) stay masks
    Image.fromarray(labels).save(tmp_path / "labels.png")
    assert load_mask(tmp_path / "labels.png").sum() == 4
    assert load_mask(tmp_path / "soft.png", threshold=30).sum() == 14
