"""Dataset readers on the shared real images and on small fixtures built from real VisA split rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.detectors.data.datasets import (
    detect_layout,
    load_image,
    load_mask,
    open_dataset,
    read_folder,
    read_meta_json,
    read_mvtec,
    read_visa_csv,
    sample_references,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MVTEC = DATASETS / "mvtec_ad"
VISA_CSV = DATASETS / "visa_split_csv" / "split_csv" / "1cls.csv"

needs_data = pytest.mark.skipif(not MVTEC.is_dir(), reason="shared datasets not present")


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@needs_data
def test_mvtec_grid_with_masks() -> None:
    (grid,) = read_mvtec(MVTEC, categories=["grid"])
    assert (grid.name, grid.dataset, grid.has_masks) == ("grid", "mvtec", True)
    assert len(grid.train) == 25 and len(grid.test) == 14 and grid.n_anomalous == 11
    assert {s.defect_type for s in grid.test} == {"good", "bent", "broken", "glue", "metal_contamination", "thread"}
    for s in grid.test:
        assert (s.mask_path is None) == (s.label == 0)
        if s.label:
            assert s.mask_path.name == f"{s.image_path.stem}_mask.png"
            assert s.mask_path.parent.name == s.defect_type
    assert all(s.label == 0 and s.split == "train" for s in grid.train)
    sample = next(s for s in grid.test if s.label)
    image = load_image(sample.image_path)  # grid is grayscale (mode L) on disk
    assert image.shape == (1024, 1024, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])
    mask = load_mask(sample.mask_path, image.shape[:2])
    assert mask.dtype == bool and 0 < mask.sum() < mask.size
    assert not load_mask(None, (4, 5)).any()
    # a category folder itself reads the same
    assert [s.key for s in read_mvtec(MVTEC / "grid")[0].test] == [s.key for s in grid.test]


@needs_data
def test_mvtec_bottle_without_masks_is_flagged() -> None:
    (bottle,) = open_dataset(MVTEC, categories=["bottle"])
    assert bottle.has_masks is False
    assert bottle.n_anomalous == 63 and len(bottle.test) == 83 and len(bottle.train) == 17
    assert any("image metrics only" in n for n in bottle.notes)
    assert load_image(bottle.test[0].image_path).shape == (900, 900, 3)
    with pytest.raises(FileNotFoundError):
        read_mvtec(MVTEC, categories=["carpet"])


@needs_data
def test_hazelnut_toy_folder_reader() -> None:
    root = DATASETS / "hazelnut_toy"
    assert detect_layout(root) == "folder"
    (haz,) = open_dataset(root)
    assert haz.name == "hazelnut" and haz.dataset == "folder" and haz.has_masks
    assert len(haz.train) == 34 and len(haz.test) == 34 + 17
    bad = [s for s in haz.test if s.label]
    assert len(bad) == 17 and {s.defect_type for s in bad} == {"colour"}
    assert all(s.mask_path == root / "hazelnut" / "mask" / "colour" / s.image_path.name for s in bad)
    mask = load_mask(bad[0].mask_path, load_image(bad[0].image_path).shape[:2])
    assert mask.any()
    refs = sample_references(haz.train, 4, seed=0)
    test = haz.test_samples(exclude=refs)
    assert len(test) == len(haz.test) - 4 and not {s.image_path for s in refs} & {s.image_path for s in test}


def test_plain_folder_good_bad_masks(tmp_path: Path) -> None:
    cat = tmp_path / "widget"
    _png(cat / "good" / "a.png", np.zeros((8, 8), np.uint8))
    _png(cat / "good" / "b.png", np.zeros((8, 8), np.uint8))
    _png(cat / "bad" / "c.png", np.full((8, 8, 3), 200, np.uint8))
    _png(cat / "bad" / "d.png", np.full((8, 8, 3), 200, np.uint8))
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 255
    _png(cat / "masks" / "c.png", m)
    (widget,) = read_folder(cat)
    assert widget.has_masks is False  # d.png has no mask
    assert any("1 of 2" in n for n in widget.notes)
    _png(cat / "masks" / "d_mask.png", m)
    (widget,) = read_folder(tmp_path)
    assert widget.has_masks and [s.label for s in widget.test] == [0, 0, 1, 1]
    assert load_mask(widget.test[2].mask_path).sum() == 4


def _visa_fixture(root: Path) -> dict[str, list[dict[str, str]]]:
    """A VisA root with split_csv/1cls.csv holding real rows of the official CSV, and small images for them."""
    with VISA_CSV.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    picked: list[dict[str, str]] = []
    for obj in ("candle", "pcb1"):
        for split, label, n in (("train", "normal", 3), ("test", "normal", 2), ("test", "anomaly", 2)):
            picked += [r for r in rows if (r["object"], r["split"], r["label"]) == (obj, split, label)][:n]
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(picked)
    for i, r in enumerate(picked):
        _png(root / r["image"], np.full((6, 10, 3), i, np.uint8))  # .JPG name, PNG bytes: Pillow sniffs content
        if r["mask"] and not (r["object"] == "pcb1" and r is picked[-1]):  # last pcb1 anomaly: mask missing
            m = np.zeros((6, 10), np.uint8)
            m[1:3, 2:5] = 1 + i % 3  # VisA masks hold small non-zero values, not 255
            _png(root / r["mask"], m)
    return {"rows": picked}


@pytest.mark.skipif(not VISA_CSV.is_file(), reason="VisA split CSV not present")
def test_visa_csv_reader_on_real_rows(tmp_path: Path) -> None:
    rows = _visa_fixture(tmp_path)["rows"]
    assert detect_layout(tmp_path) == "visa"
    cats = {c.name: c for c in read_visa_csv(tmp_path)}
    assert sorted(cats) == ["candle", "pcb1"]
    candle, pcb1 = cats["candle"], cats["pcb1"]
    assert len(candle.train) == 3 and len(candle.test) == 4 and candle.n_anomalous == 2
    assert candle.has_masks and not pcb1.has_masks
    assert candle.train[0].image_path == tmp_path / rows[0]["image"]
    anomaly = next(s for s in candle.test if s.label)
    assert anomaly.defect_type == "anomaly" and anomaly.mask_path.suffix == ".png"
    mask = load_mask(anomaly.mask_path, load_image(anomaly.image_path).shape[:2])
    assert mask.sum() == 6  # values 1..3 binarised as != 0
    assert load_image(anomaly.image_path).shape == (6, 10, 3)
    assert [c.name for c in read_visa_csv(tmp_path, categories=["pcb1"])] == ["pcb1"]


def test_visa_converted_to_mvtec_layout_masks_without_suffix(tmp_path: Path) -> None:
    cat = tmp_path / "candle"
    _png(cat / "train" / "good" / "0000.JPG", np.zeros((4, 4, 3), np.uint8))
    _png(cat / "test" / "good" / "0001.JPG", np.zeros((4, 4, 3), np.uint8))
    _png(cat / "test" / "bad" / "0002.JPG", np.zeros((4, 4, 3), np.uint8))
    _png(cat / "ground_truth" / "bad" / "0002.png", np.eye(4, dtype=np.uint8))
    (candle,) = read_mvtec(tmp_path)
    assert candle.has_masks and candle.test[0].defect_type == "bad"
    assert candle.test[0].mask_path == cat / "ground_truth" / "bad" / "0002.png"
    assert load_mask(candle.test[0].mask_path).sum() == 4


def test_meta_json_reader(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _png(tmp_path / "screw" / name / "000.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "screw" / "gt" / "000.png", np.eye(4, dtype=np.uint8) * 255)
    entry = {"cls_name": "screw", "specie_name": "good", "anomaly": 0, "mask_path": ""}
    meta = {
        "train": {"screw": [{**entry, "img_path": "screw/a/000.png"}]},
        "test": {"screw": [{**entry, "img_path": "screw/b/000.png"},
                           {**entry, "img_path": "screw/c/000.png", "anomaly": 1, "specie_name": "thread_top",
                            "mask_path": "screw/gt/000.png"}]},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert detect_layout(tmp_path) == "meta"
    (screw,) = read_meta_json(tmp_path)
    assert len(screw.train) == 1 and [s.label for s in screw.test] == [0, 1] and screw.has_masks
    assert screw.test[1].defect_type == "thread_top" and screw.test[1].mask_path == tmp_path / "screw/gt/000.png"
    meta["test"]["screw"][1]["mask_path"] = ""
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert read_meta_json(tmp_path)[0].has_masks is False


def test_sample_references_is_deterministic_nested_and_order_independent(tmp_path: Path) -> None:
    pool = [tmp_path / f"{i:03d}.png" for i in range(20)]
    a = sample_references(pool, 4, seed=0)
    assert a == sample_references(list(reversed(pool)), 4, seed=0)
    assert len(set(a)) == 4 and set(a) <= set(pool)
    assert sample_references(pool, 2, seed=0) == a[:2]  # nested over k
    assert {tuple(sample_references(pool, 4, seed=s)) for s in range(5)} != {tuple(a)}
    # machine-independent: same names under another root give the same choice
    other = [Path("/elsewhere") / p.name for p in pool]
    assert [p.name for p in sample_references(other, 4, seed=0)] == [p.name for p in a]
    assert sample_references(pool, 0, seed=3) == []
    with pytest.raises(ValueError):
        sample_references(pool, 21, seed=0)


@needs_data
def test_masks_with_an_alpha_channel_mark_only_their_defects(tmp_path: Path) -> None:
    """The brightest channel included alpha: an opaque RGBA or LA mask (black background, alpha 255), as annotation
    tools export them, marked every pixel defective (a perfect map then scored pixel AUROC 0.51)."""
    [sample] = [s for s in read_mvtec(MVTEC, categories=["grid"])[0].test if s.mask_path is not None][:1]
    truth = load_mask(sample.mask_path)
    grey = np.where(truth, 255, 0).astype(np.uint8)
    opaque = np.full_like(grey, 255)
    variants = {"rgba": Image.fromarray(np.dstack([grey, grey, grey, opaque]), "RGBA"),
                "la": Image.fromarray(np.dstack([grey, opaque]), "LA"),
                "p": Image.fromarray(grey).convert("P")}
    variants["p"].info["transparency"] = 0
    for name, image in variants.items():
        image.save(tmp_path / f"{name}.png")
        assert np.array_equal(load_mask(tmp_path / f"{name}.png"), truth), name
    assert 0 < truth.sum() < truth.size
