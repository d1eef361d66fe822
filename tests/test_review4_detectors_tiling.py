"""A reference image is held to the tile limit the engine holds frames to (decode.max_tiles' default): a strip of an
extreme aspect ratio fails its build with a clear error, before it is resized into thousands of tiles, and the
version serving keeps serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.daemon.config import DecodeConfig, ProductConfig, RegistryConfig
from inspectd.daemon.engine import ScoringEngine
from inspectd.daemon.registry import READY, ProductRegistry
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.building import BuildError
from inspectd.streams.codec import FrameError

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def strip(width: int, height: int) -> np.ndarray:
    good = np.asarray(Image.open(HAZELNUT / "good" / "00.png").convert("RGB"))
    return np.ascontiguousarray(np.resize(good, (height, width, 3)))


async def test_a_strip_reference_fails_the_build_and_the_old_version_keeps_serving(tiny_backbone: ClipBackbone,
                                                                                   tmp_path: Path) -> None:
    good, strips = tmp_path / "good", tmp_path / "strips"
    good.mkdir()
    strips.mkdir()
    shutil.copy(HAZELNUT / "good" / "00.png", good / "00.png")
    shutil.copy(HAZELNUT / "good" / "01.png", strips / "00.png")
    Image.fromarray(strip(2000, 20)).save(strips / "01.png")  # 100:1 -> 125 tiles of 240 px
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    try:
        first = await registry.put(ProductConfig(id="nut", object_name="hazelnut", references=str(good), shots=1))
        with pytest.raises(BuildError, match=r"strips/01.png \(2000x20\) needs 125 inputs of 240 px > "
                                             r"decode.max_tiles 16"):
            await registry.put(ProductConfig(id="nut", object_name="hazelnut", references=str(strips), shots=2))
        assert registry.get("nut") is first and registry.status("nut") == READY  # was: built from 125 tiles
        assert "2000x20" in registry.error("nut")
    finally:
        registry.close()


async def test_builds_follow_decode_max_tiles_and_hold_holdout_images_to_it(tiny_backbone: ClipBackbone,
                                                                           tmp_path: Path) -> None:
    """With decode.max_tiles raised, a reference as wide as the frames the daemon takes builds (a false alarm saves
    such a frame into the references); a holdout strip beyond it is refused by name (holdout images were tiled
    without any bound)."""
    refs, holdout = tmp_path / "refs", tmp_path / "holdout"
    refs.mkdir()
    holdout.mkdir()
    shutil.copy(HAZELNUT / "good" / "00.png", refs / "00.png")
    Image.fromarray(strip(4800, 240)).save(refs / "01.png")  # 20 tiles of 240 px
    Image.fromarray(strip(2000, 20)).save(holdout / "strip.png")  # 125
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False), max_tiles=32)
    try:
        wide = await registry.put(ProductConfig(id="nut", object_name="hazelnut", references=str(refs), shots=2))
        assert wide.references == ("00.png", "01.png")
        config = ProductConfig(id="nut", object_name="hazelnut", references=str(refs), shots=2)
        config.threshold.holdout_dir = str(holdout)
        with pytest.raises(BuildError, match=r"holdout/strip.png \(2000x20\) needs 125 inputs .* decode.max_tiles 32"):
            await registry.put(config)
        assert registry.get("nut") is wide
    finally:
        registry.close()


@pytest.mark.parametrize("detector", ["winclip", "randword"])
def test_references_are_held_to_the_engines_tile_rule(tiny_backbone: ClipBackbone, detector: str) -> None:
    """The same shapes the engine refuses as frames (decode.max_tiles, default) are refused as references."""
    options = {"use_ffn": False} if detector == "randword" else {}
    det = create_detector(detector, tiny_backbone, options)
    engine = ScoringEngine([torch.device("cpu")], decode_threads=0, max_tiles=DecodeConfig().max_tiles)
    try:
        widest, too_wide = strip(3120, 240), strip(3121, 240)  # 16 and 17 tiles of 240 px
        engine.check_tiles(det, widest.shape[:2])
        det.fit(ProductSpec("nut", "hazelnut"), [widest])
        with pytest.raises(FrameError):
            engine.check_tiles(det, too_wide.shape[:2])
        with pytest.raises(ValueError, match=r"reference image 1 of 1 \(3121x240\) needs 17 inputs"):
            det.fit(ProductSpec("nut", "hazelnut"), [too_wide])
    finally:
        engine.close()
