"""`model.resize`: "fast" pre-processing of large frames stays within 2/255 of the exact (open_clip) resize, and
the setting reaches the pre-processor every detector of the daemon's model scores through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.app import build_backbone
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.detectors.base import create_detector
from inspectd.detectors.preprocess import InputSpec, Preprocessor

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def photo(width: int, height: int) -> np.ndarray:
    path = sorted((HAZELNUT / "good").glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC))


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (3840, 2160), (2160, 3840)])
def test_fast_resize_keeps_the_layout_and_stays_within_two_levels_of_exact(width: int, height: int) -> None:
    frame = photo(width, height)
    exact, exact_layout = Preprocessor(240)(frame)
    fast, fast_layout = Preprocessor(240, resize="fast")(frame)
    assert fast_layout == exact_layout and fast.shape == exact.shape
    levels = (fast - exact).abs() * Preprocessor(240).std * 255  # back to 8-bit levels per channel
    assert 0 < float(levels.max()) <= 2.0 + 1e-3  # not the same computation, and within 2/255
    assert float(levels.mean()) < 0.5


@pytest.mark.parametrize("mode", ["tile", "square"])
def test_frames_shrunk_less_than_4x_are_the_same_under_both(mode: str) -> None:
    frame = photo(640, 480)  # resized (2x and 2.7x): under 2 x reducing_gap, so no whole-factor step
    exact, fast = Preprocessor(240, mode=mode)(frame)[0], Preprocessor(240, mode=mode, resize="fast")(frame)[0]
    assert np.array_equal(exact.numpy(), fast.numpy())


def test_a_state_fitted_under_fast_is_not_taken_for_an_exact_one(tiny_backbone, tiny_checkpoint: Path) -> None:  # noqa: ANN001
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec

    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu", resize="fast"))
    exact_print = create_detector("winclip", tiny_backbone).config_fingerprint()
    assert create_detector("winclip", fast).config_fingerprint() != exact_print
    assert create_detector("winclip", tiny_backbone).config_fingerprint() == exact_print  # stable


def test_a_bad_resize_value_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.resize"):
        parse_config({"model": {"resize": "quick"}})
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocessor(240, resize="quick")


def test_the_setting_reaches_every_pre_processor_of_the_model(tiny_checkpoint: Path) -> None:
    config = parse_config({"model": {"arch": "inspectd-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu",
                                     "resize": "fast"}})
    backbone = build_backbone(config)
    frame = photo(1920, 1080)
    square = backbone.preprocessor_for(InputSpec(backbone.image_size, "square"))  # APRIL-GAN-style inputs
    for pre in (create_detector("winclip", backbone).preprocessor, square):
        tiles, _ = pre(frame)
        exact, _ = Preprocessor(pre.size, mode=pre.mode)(frame)
        assert pre.resize == "fast" and not np.array_equal(tiles.numpy(), exact.numpy())
