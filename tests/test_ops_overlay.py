"""Heat-map overlays on a real hazelnut frame with its ground-truth defect mask as the anomaly map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.streams.overlay import colormap, overlay, save_overlay

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


@pytest.fixture(scope="module")
def frame_and_map() -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(HAZELNUT / "colour" / "00.png").convert("RGB"))
    mask = np.asarray(Image.open(HAZELNUT / "mask" / "colour" / "00.png").convert("L")).astype(np.float32) / 255.0
    assert image.shape[:2] == mask.shape and 0 < (mask > 0.5).mean() < 0.5
    return image, mask


def redness(pixels: np.ndarray) -> float:
    p = pixels.astype(np.float32)
    return float(np.mean(p[..., 0] - np.maximum(p[..., 1], p[..., 2])))


def test_colormap_runs_blue_to_red() -> None:
    ramp = colormap(np.linspace(0, 1, 11))
    assert ramp.shape == (11, 3) and ramp.dtype == np.uint8
    for cmap in ("turbo", "jet"):
        lo, hi = colormap(np.array([0.1, 1.0]), cmap).astype(int)
        assert lo[2] > lo[0] and hi[0] > hi[1] + 100 and hi[0] > hi[2] + 100, (cmap, lo, hi)
    assert (colormap(np.array([np.nan, -3.0, 7.0])) == colormap(np.array([0.0, 0.0, 1.0]))).all()
    with pytest.raises(ValueError):
        colormap(np.zeros(2), "viridis")


def test_masked_region_is_redder(frame_and_map: tuple[np.ndarray, np.ndarray]) -> None:
    image, amap = frame_and_map
    out = overlay(image, amap, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    inside, outside = amap > 0.5, amap < 0.5
    assert redness(out[inside]) > redness(out[outside]) + 15
    # the overlay made it red: the defect itself is cyan-green, and the rest gets no redder
    assert redness(out[inside]) - redness(image[inside]) > 60
    assert redness(out[outside]) - redness(image[outside]) < 5
    assert np.array_equal(overlay(image, amap, alpha=0.0), image)


def test_contour_outlines_the_thresholded_region(frame_and_map: tuple[np.ndarray, np.ndarray]) -> None:
    image, amap = frame_and_map
    plain = overlay(image, amap)
    outlined = overlay(image, amap, threshold=0.5, contour_color=(0, 255, 0), contour_width=2)
    changed = np.any(outlined != plain, axis=-1)
    assert changed.any()
    assert not changed[amap > 0.5].any()  # drawn just outside the region, leaving the heat visible
    ys, xs = np.nonzero(changed)
    my, mx = np.nonzero(amap > 0.5)
    assert my.min() - 3 <= ys.min() and ys.max() <= my.max() + 3
    assert mx.min() - 3 <= xs.min() and xs.max() <= mx.max() + 3
    assert (outlined[changed] == (0, 255, 0)).all()
    assert np.array_equal(overlay(image, amap, threshold=2.0), plain)  # nothing above threshold: no contour


def test_small_map_gray_and_rgba_inputs(frame_and_map: tuple[np.ndarray, np.ndarray]) -> None:
    image, amap = frame_and_map
    h, w = amap.shape
    small = amap.reshape(h // 4, 4, w // 4, 4).max(axis=(1, 3))  # a detector's coarser map
    out = overlay(image, small)
    assert out.shape == image.shape
    assert redness(out[amap > 0.5]) > redness(out[amap < 0.5]) + 15
    gray = image.mean(axis=-1).astype(np.uint8)
    assert overlay(gray, amap).shape == image.shape
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    assert np.array_equal(overlay(rgba, amap), overlay(image, amap))
    with pytest.raises(ValueError):
        overlay(image.astype(np.float32), amap)
    with pytest.raises(ValueError):
        overlay(image, amap, alpha=1.5)


def test_save_overlay_writes_a_png_of_the_input_size(tmp_path: Path,
                                                     frame_and_map: tuple[np.ndarray, np.ndarray]) -> None:
    image, amap = frame_and_map
    path = save_overlay(tmp_path / "sub" / "00_overlay.png", image, amap, threshold=0.5)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.mode == "RGB" and saved.size == (image.shape[1], image.shape[0])
        assert np.array_equal(np.asarray(saved), overlay(image, amap, 0.5))


def test_an_overlay_reads_alone_verdict_score_threshold_colour_bar(tmp_path: Path, capsys) -> None:
    """`inspectd overlay --results` as a user runs it: readable names, a legend, the contour kept under --stretch,
    and a reason for every skipped result."""
    import json

    from inspectd.cli import main
    from inspectd.streams.overlay import LEGEND_HEIGHT, VERDICT_COLOURS

    frame = tmp_path / "in" / "00.png"
    frame.parent.mkdir()
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(frame)
    amap = np.zeros((64, 80), np.uint8)
    amap[20:40, 30:50] = 200
    mask = tmp_path / "m.png"
    Image.fromarray(amap).save(mask)
    records = [
        {"kind": "result", "product": "nut", "frame_id": "00.png", "verdict": "NG", "score": 0.81, "threshold": 0.5,
         "mask_path": str(mask), "meta": {"path": str(frame)}},
        {"kind": "result", "product": "nut", "frame_id": "r1", "verdict": "OK", "score": 0.1, "threshold": 0.5,
         "mask_path": "", "mask_note": "mask output disabled for this product", "meta": {}},
        {"kind": "result", "product": "nut", "frame_id": "r2", "verdict": "OK", "score": 0.1, "threshold": 0.5,
         "mask_path": str(mask), "meta": {}},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["overlay", "--results", str(results), "--out", str(tmp_path / "ov"), "--stretch"]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "ov" / "nut" / "00.NG.png"  # readable and unique, no doubled suffix
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (64 + LEGEND_HEIGHT, 80, 3)
    legend = image[64:]
    assert (legend == np.array(VERDICT_COLOURS["NG"])).all(axis=-1).sum() > 50  # the verdict badge
    assert (image[:64] == 255).all(axis=-1).sum() > 20  # the threshold outline survives --stretch
    assert "r1: skipped: no mask (mask output disabled" in captured.err
    assert "r2: skipped: no frame file" in captured.err and "1 overlay(s)" in captured.out
