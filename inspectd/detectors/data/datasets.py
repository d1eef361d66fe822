"""Dataset readers shared by training and offline evaluation (MVTec AD, VisA CSV and MVTec-like, meta.json,
plain folders), image/mask loading (RGB uint8, bool masks) and deterministic k-shot reference sampling.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from inspectd.jpeg_draft import MinSize, draft_jpeg

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_DIR_NAMES = ("masks", "mask", "ground_truth")
NORMAL = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split. ``label`` 1 = anomalous; ``defect_type`` is "good" for normal images."""

    image_path: Path
    label: int
    mask_path: Path | None
    defect_type: str
    category: str
    split: str = "test"

    @property
    def key(self) -> str:
        """Machine-independent identity (category/split/defect/file name), used for sampling and caching."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.image_path.name}"


@dataclass
class Category:
    """One category of a dataset: the normal training pool (for references) and the test samples."""

    name: str
    dataset: str
    root: Path
    train: list[Sample]
    test: list[Sample]
    has_masks: bool
    notes: list[str] = field(default_factory=list)

    def test_samples(self, exclude: Iterable[Sample] = ()) -> list[Sample]:
        """Test samples minus any used as references (only matters where train and test share images)."""
        used = {s.image_path for s in exclude}
        return [s for s in self.test if s.image_path not in used]

    @property
    def n_anomalous(self) -> int:
        return sum(s.label for s in self.test)


MASK_THRESHOLD = 127  # a mask pixel is anomalous above this (8-bit); 0/1-valued masks: above 0


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def readable(path: Path) -> bool:
    """True when the file's header is an image Pillow can open (cheap: nothing is decoded)."""
    try:
        with Image.open(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:  # noqa: BLE001 - any unreadable header
        return False


def _images(folder: Path, skipped: list[str]) -> list[Path]:
    """The readable images of ``folder``; files with an image name but no readable image (a text file called
    .png) go into ``skipped`` as "<folder>/<name>", for the category's notes."""
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if _is_image(p))
    bad = [p for p in found if not readable(p)]
    skipped += [f"{folder.name}/{p.name}" for p in bad]
    return [p for p in found if p not in bad]


def _find_mask(folder: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _masks_flag(category: str, test: list[Sample], notes: list[str]) -> bool:
    anomalous = [s for s in test if s.label]
    missing = sum(1 for s in anomalous if s.mask_path is None)
    if not anomalous:
        notes.append(f"{category}: no anomalous test images")
        return False
    if missing:
        notes.append(f"{category}: {missing} of {len(anomalous)} anomalous images have no mask: image metrics only")
        return False
    return True


def _finish(name: str, dataset: str, root: Path, train: list[Sample], test: list[Sample],
            notes: list[str], skipped: Sequence[str] = ()) -> Category:
    if skipped:
        notes.append(f"{name}: {len(skipped)} file(s) with an image suffix but no readable image skipped: "
                     + ", ".join(sorted(skipped)[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not train:
        notes.append(f"{name}: no normal training images: only 0-shot evaluation possible")
    return Category(name, dataset, root, train, test, _masks_flag(name, test, notes), notes)


# --------------------------------------------------------------------------------------------- MVTec-like layout


def read_mvtec(root: str | Path, categories: Iterable[str] | None = None,
               mask_suffixes: Sequence[str] = ("_mask", "")) -> list[Category]:
    """MVTec AD layout ``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/<stem>_mask.png``.

    Masks are looked up with each of ``mask_suffixes`` in turn, so VisA converted to this layout (masks named like
    their image, without ``_mask``) reads too. ``root`` may also be one category folder itself.
    """
    root = Path(root)
    if (root / "test").is_dir():
        folders = [root]
    else:
        folders = sorted(p for p in root.iterdir() if (p / "test").is_dir())
    if categories is not None:
        wanted = set(categories)
        folders = [f for f in folders if f.name in wanted]
        missing = wanted - {f.name for f in folders}
        if missing:
            raise FileNotFoundError(f"{root}: no categories {sorted(missing)}")
    out = []
    for folder in folders:
        name = folder.name
        skipped: list[str] = []
        train = [Sample(p, 0, None, NORMAL, name, "train") for p in _images(folder / "train" / NORMAL, skipped)]
        test: list[Sample] = []
        for defect_dir in sorted(d for d in (folder / "test").iterdir() if d.is_dir()):
            defect = defect_dir.name
            for p in _images(defect_dir, skipped):
                if defect == NORMAL:
                    test.append(Sample(p, 0, None, NORMAL, name))
                else:
                    mask = _find_mask(folder / "ground_truth" / defect, p.stem, mask_suffixes)
                    test.append(Sample(p, 1, mask, defect, name))
        out.append(_finish(name, "mvtec", folder, train, test, [], skipped))
    if not out:
        raise FileNotFoundError(f"{root}: no MVTec-layout category (<cat>/test/) found")
    return out


# --------------------------------------------------------------------------------------------- VisA split CSV


def read_visa_csv(root: str | Path, csv_path: str | Path | None = None,
                  categories: Iterable[str] | None = None) -> list[Category]:
    """VisA from its split CSV (``split_csv/1cls.csv``: object,split,label,image,mask; paths relative to root).

    Labels are "normal"/"anomaly"; VisA masks are binarised as value != 0 by `load_mask`. A mask listed in the CSV
    but absent on disk counts as missing.
    """
    root = Path(root)
    csv_file = Path(csv_path) if csv_path is not None else root / "split_csv" / "1cls.csv"
    wanted = set(categories) if categories is not None else None
    by_cat: dict[str, tuple[list[Sample], list[Sample]]] = {}
    with csv_file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"object", "split", "label", "image", "mask"}
        if not needed <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_file}: expected columns {sorted(needed)}, got {reader.fieldnames}")
        for row in reader:
            cat = row["object"].strip()
            if wanted is not None and cat not in wanted:
                continue
            label_text = row["label"].strip().lower()
            if label_text not in ("normal", "anomaly"):
                raise ValueError(f"{csv_file}: unknown label {row['label']!r} (expected normal/anomaly)")
            label = int(label_text == "anomaly")
            split = row["split"].strip().lower()
            mask_text = (row["mask"] or "").strip()
            mask = root / mask_text if label and mask_text and (root / mask_text).is_file() else None
            sample = Sample(root / row["image"].strip(), label, mask, "anomaly" if label else NORMAL, cat, split)
            train, test = by_cat.setdefault(cat, ([], []))
            if split == "train":
                if not label:
                    train.append(sample)
            elif split == "test":
                test.append(sample)
            else:
                raise ValueError(f"{csv_file}: unknown split {row['split']!r}")
    if wanted is not None and wanted - set(by_cat):
        raise FileNotFoundError(f"{csv_file}: no categories {sorted(wanted - set(by_cat))}")
    return [_finish(cat, "visa", root, *by_cat[cat], []) for cat in sorted(by_cat)]


# --------------------------------------------------------------------------------------------- meta.json


def read_meta_json(root: str | Path, meta_path: str | Path | None = None,
                   categories: Iterable[str] | None = None) -> list[Category]:
    """The ``meta.json`` of APRIL-GAN/AnomalyCLIP reproductions: ``{"train"|"test": {cls: [{img_path, mask_path,
    cls_name, specie_name, anomaly}, ...]}}``, paths relative to ``root``. Train entries with anomaly=1 are not
    used as references.
    """
    root = Path(root)
    meta = json.loads((Path(meta_path) if meta_path is not None else root / "meta.json").read_text())
    wanted = set(categories) if categories is not None else None
    names = sorted(set(meta.get("train", {})) | set(meta.get("test", {})))
    out = []
    for cat in names:
        if wanted is not None and cat not in wanted:
            continue
        splits: dict[str, list[Sample]] = {"train": [], "test": []}
        for split in splits:
            for entry in meta.get(split, {}).get(cat, []):
                label = int(entry.get("anomaly", 0))
                mask_text = (entry.get("mask_path") or "").strip()
                mask = root / mask_text if label and mask_text and (root / mask_text).is_file() else None
                defect = entry.get("specie_name") or (NORMAL if not label else "anomaly")
                sample = Sample(root / entry["img_path"], label, mask, defect, cat, split)
                if split == "test" or not label:
                    splits[split].append(sample)
        out.append(_finish(cat, "meta", root, splits["train"], splits["test"], []))
    if wanted is not None and wanted - {c.name for c in out}:
        raise FileNotFoundError(f"meta.json under {root}: no categories {sorted(wanted - {c.name for c in out})}")
    return out


# --------------------------------------------------------------------------------------------- plain folders


def read_folder(root: str | Path, categories: Iterable[str] | None = None) -> list[Category]:
    """Plain folders: ``good/`` (normal), every other image folder a defect type (``bad/``, ``colour/``...), masks
    optional in ``masks/`` (or ``mask/``, ``ground_truth/``) as ``<stem>.*`` or ``<defect>/<stem>.*`` with the image's
    stem (``_mask`` suffix accepted). ``root`` is one category or holds several such category folders; the category
    name is the folder name (e.g. ``hazelnut_toy/hazelnut``: good/, colour/, mask/colour/).

    There is no train split: the normal pool is ``good/`` and the same images are in the test set, so a runner
    must drop the sampled references with `Category.test_samples(exclude=refs)`.
    """
    root = Path(root)
    folders = [root] if (root / NORMAL).is_dir() else sorted(p for p in root.iterdir() if (p / NORMAL).is_dir())
    if categories is not None:
        folders = [f for f in folders if f.name in set(categories)]
    out = []
    for folder in folders:
        name = folder.name
        mask_root = next((folder / d for d in MASK_DIR_NAMES if (folder / d).is_dir()), None)
        skipped = []
        goods = _images(folder / NORMAL, skipped)
        train = [Sample(p, 0, None, NORMAL, name, "train") for p in goods]
        test = [Sample(p, 0, None, NORMAL, name) for p in goods]
        for defect_dir in sorted(d for d in folder.iterdir() if d.is_dir() and d.name not in (NORMAL, *MASK_DIR_NAMES)):
            for p in _images(defect_dir, skipped):
                mask = None
                if mask_root is not None:
                    mask = (_find_mask(mask_root / defect_dir.name, p.stem, ("", "_mask"))
                            or _find_mask(mask_root, p.stem, ("", "_mask")))
                test.append(Sample(p, 1, mask, defect_dir.name, name))
        notes = [f"{name}: no train split; references come from good/ and are excluded from the test set"]
        out.append(_finish(name, "folder", folder, train, test, notes, skipped))
    if not out:
        raise FileNotFoundError(f"{root}: no folder with a good/ subfolder")
    return out


# --------------------------------------------------------------------------------------------- auto + loading


def detect_layout(root: str | Path) -> str:
    """"meta", "visa", "mvtec" or "folder", from what ``root`` contains."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return "meta"
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    subdirs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if (root / "test").is_dir() or any((p / "test").is_dir() for p in subdirs):
        return "mvtec"
    if (root / NORMAL).is_dir() or any((p / NORMAL).is_dir() for p in subdirs):
        return "folder"
    raise ValueError(f"{root}: unrecognised dataset layout (no meta.json, split_csv/1cls.csv, */test or */good)")


READERS = {"mvtec": read_mvtec, "visa": read_visa_csv, "meta": read_meta_json, "folder": read_folder}


def open_dataset(root: str | Path, layout: str = "auto", categories: Iterable[str] | None = None) -> list[Category]:
    """Read every (or the named) categories of a dataset with the reader for ``layout`` (auto-detected)."""
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in READERS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(READERS)}")
    return READERS[layout](root, categories=categories)


def iter_samples(categories: Iterable[Category], split: str = "test") -> Iterator[Sample]:
    """All samples of ``split`` ("train" or "test") over the categories, in order."""
    for cat in categories:
        yield from (cat.train if split == "train" else cat.test)


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 H×W×3 (grayscale, palette, 16-bit and alpha images converted)."""
    return load_image_scaled(path)[0]


def load_image_scaled(path: str | Path, min_size: MinSize | None = None
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """(`load_image`'s pixels, the image's own (H, W)); with ``min_size`` a JPEG is decoded smaller where that keeps
    at least ``min_size(H, W)``, by the daemon's rule (`inspectd.jpeg_draft.draft_jpeg`; the daemon also turns
    frames by their EXIF orientation, which dataset images lack)."""
    with Image.open(path) as im:
        size = (im.size[1], im.size[0])
        draft_jpeg(im, min_size, exif_turns=False)
        return _rgb8(im), size


def _rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max() if arr.max() > 0 else 1.0
        arr = np.clip(arr / (65535.0 if peak > 255 else 255.0) * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_mask(path: str | Path | None, shape: tuple[int, int] | None = None,
              threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Bool H×W mask: True where the file (its brightest channel) is above ``threshold`` — soft, JPEG-ish grey
    borders are not regions — or above 0 for label-valued masks whose maximum is below the threshold; all False
    of ``shape`` when ``path`` is None."""
    if path is None:
        if shape is None:
            raise ValueError("load_mask(None) needs the image shape")
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):  # alpha is opacity, not defect: an opaque mask is all 255
            im = im.convert("RGB" if im.mode != "LA" else "L")
        elif im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGB")
        arr = np.asarray(im)
    values = arr.max(axis=2) if arr.ndim == 3 else arr
    # label-valued masks (VisA stores 1, 2, 3 ...; some sets 0/1) never reach the 8-bit threshold: above 0 there
    mask = values > (threshold if values.max(initial=0) > threshold else 0)
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"{path}: mask {mask.shape} does not match image {tuple(shape)}")
    return mask


# --------------------------------------------------------------------------------------------- k-shot sampling

T = TypeVar("T", Sample, Path, str)


def _sampling_key(item: Sample | Path | str) -> str:
    return item.key if isinstance(item, Sample) else Path(item).name


def sample_references(category_train_goods: Sequence[T], k: int, seed: int) -> list[T]:
    """The k-shot references: ``k`` distinct normal training images chosen by ``seed``.

    Deterministic across machines, listing orders and numpy versions (the order is a SHA-256 of the seed and each
    image's machine-independent key), and nested: the k-shot set of a seed contains its (k-1)-shot set.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    if k > len(category_train_goods):
        raise ValueError(f"{k}-shot needs {k} normal training images, only {len(category_train_goods)} available")
    if any(isinstance(s, Sample) and s.label for s in category_train_goods):
        raise ValueError("references must be normal images (label 0)")

    def order(item: T) -> tuple[str, str]:
        key = _sampling_key(item)
        return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest(), str(item.image_path if isinstance(
            item, Sample) else item)

    return sorted(category_train_goods, key=order)[:k]
