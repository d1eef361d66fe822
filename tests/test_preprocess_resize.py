"""`model.resize`: "fast" pre-processing of large frames stays within 2/255 of the exact (open_clip) resize, and
the setting reaches the pre-processor every detector of the daemon's model scores through."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from inspectd.daemon.app import build_backbone
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.daemon.engine import PreparedFrame, ScoringEngine
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.preprocess import InputSpec, Preprocessor
from inspectd.streams.codec import decode_frame_scaled
from inspectd.streams.schema import Frame

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


def jpeg(image: np.ndarray, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(image).save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def prepared_by_engine(device: torch.device, detector, payload: bytes | None = None,  # noqa: ANN001
                       frame: Frame | None = None) -> PreparedFrame:
    """The daemon's engine preparing one frame (decode on its thread) for ``detector``."""
    engine = ScoringEngine([device], decode_threads=0)
    try:
        [prepared] = asyncio.run(engine.prepare([frame or Frame("p", "l", "f", 0.0, payload=payload)],
                                                lambda _p: detector))
    finally:
        engine.close()
    return prepared


@pytest.mark.parametrize(("orientation", "keep", "shown", "decoded"), [
    (None, (480, 854), (1080, 1920), (540, 960)),  # libjpeg's 1/2 scale: the largest step that keeps 480 x 854
    (6, (854, 480), (1920, 1080), (960, 540)),  # stored landscape, shown portrait: asked and shrunk as shown
])
def test_a_jpeg_is_decoded_smaller_only_as_far_as_asked(orientation: int | None, keep: tuple[int, int],
                                                        shown: tuple[int, int], decoded: tuple[int, int]) -> None:
    data = jpeg(photo(1920, 1080), orientation)
    asked = []

    def min_size(height: int, width: int) -> tuple[int, int]:
        asked.append((height, width))
        return keep

    image, size = decode_frame_scaled(Frame("p", "l", "f", 0.0, payload=data), None, min_size)
    assert asked == [shown] and size == shown and image.shape == (*decoded, 3)
    assert decode_frame_scaled(Frame("p", "l", "f", 0.0, payload=data))[0].shape == (*shown, 3)
    assert decode_frame_scaled(Frame("p", "l", "f", 0.0, payload=data), None, lambda h, w: None)[0].shape == (
        *shown, 3)


def test_only_jpeg_decoders_shrink_on_the_way() -> None:
    png = io.BytesIO()
    Image.fromarray(photo(1920, 1080)).save(png, format="PNG")
    image, size = decode_frame_scaled(Frame("p", "l", "f", 0.0, payload=png.getvalue()), None, lambda h, w: (480, 854))
    assert image.shape == (1080, 1920, 3) and size == (1080, 1920)


def test_fast_decodes_jpeg_frames_smaller_with_the_frames_own_layout(tiny_checkpoint: Path) -> None:
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.pipeline import ScoreItem, run

    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu", resize="fast"))
    detector = create_detector("winclip", fast)
    state = detector.fit(ProductSpec("p", "hazelnut"), [])
    frame = photo(1920, 1080)
    data = jpeg(frame)
    prepared = prepared_by_engine(fast.device, detector, data)
    full = decode_frame_scaled(Frame("p", "l", "f", 0.0, payload=data))[0]
    assert prepared.size == (1080, 1920) and prepared.layout == detector.preprocessor(full)[1]
    decoded_full = detector.preprocessor(full)[0]
    assert not torch.equal(prepared.tiles, decoded_full)  # decoded at half scale, not in full
    levels = (prepared.tiles - decoded_full).abs() * Preprocessor(240).std * 255
    assert float(levels.max()) <= 3.0 and float(levels.mean()) < 0.5
    [out] = run([ScoreItem(detector, state, tiles=prepared.tiles, layout=prepared.layout)])
    assert out.map.shape == (1080, 1920)  # the frame's own size

    # a frame prepared for no detector (or another input: a hot swap) is decoded again at score time, the same way
    engine = ScoringEngine([fast.device], decode_threads=0)
    try:
        [again], _ = asyncio.run(engine.score([ScoreItem(detector, state)], [Frame("p", "l", "f", 0.0, payload=data)]))
    finally:
        engine.close()
    assert again.map.shape == (1080, 1920) and again.score == pytest.approx(out.score, abs=1e-6)


def test_offline_eval_decodes_a_jpeg_as_the_daemon_does(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.data.datasets import Sample
    from inspectd.detectors.evaluation.runner import EvalSettings, _Run

    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu", resize="fast"))
    runner = _Run(fast, EvalSettings(), None)
    data = jpeg(photo(1920, 1080))
    (tmp_path / "f.jpg").write_bytes(data)
    loaded = runner._load(None, Sample(tmp_path / "f.jpg", 0, None, "good", "p"))  # type: ignore[arg-type]
    assert loaded is not None and loaded[0].shape == (540, 960, 3) and loaded[1] == (1080, 1920)
    item = runner._item(runner.detector.fit(ProductSpec("p", "hazelnut"), []), *loaded, (256, 256))
    prepared = prepared_by_engine(fast.device, runner.detector, data)
    assert torch.equal(item.tiles, prepared.tiles) and item.layout == prepared.layout
    assert runner.fingerprint != _Run(ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint),
                                                              device="cpu")), EvalSettings(), None).fingerprint


@pytest.mark.parametrize("form", ["TIFF", "PNG"])
@pytest.mark.parametrize("resize", ["exact", "fast"])
def test_rotated_tiff_and_png_frames_keep_the_size_they_are_shown_at(tiny_checkpoint: Path, form: str,
                                                                      resize: str) -> None:
    """Pillow's TIFF reader turns an EXIF-rotated image itself and reports its shown size; a PNG's eXIf turn is
    applied after decoding: either way the frame's size is what was decoded, and its map that size."""
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.pipeline import ScoreItem, run

    backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                      resize=resize))
    detector = create_detector("winclip", backbone)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(photo(500, 300)).save(buffer, format=form, exif=exif)
    frame = Frame("p", "l", "f", 0.0, payload=buffer.getvalue())
    image, size = decode_frame_scaled(frame, None, detector.preprocessor.decode_size)
    assert image.shape == (500, 300, 3) and size == (500, 300)  # shown portrait
    prepared = prepared_by_engine(backbone.device, detector, frame=frame)
    assert prepared.size == (500, 300) and prepared.layout.original == (500, 300)
    [out] = run([ScoreItem(detector, detector.fit(ProductSpec("p", "hazelnut"), []), tiles=prepared.tiles,
                           layout=prepared.layout)])
    assert out.map.shape == (500, 300)


def test_exact_decodes_every_pixel(tiny_backbone) -> None:  # noqa: ANN001
    detector = create_detector("winclip", tiny_backbone)
    data = jpeg(photo(1920, 1080))
    prepared = prepared_by_engine(tiny_backbone.device, detector, data)
    full = decode_frame_scaled(Frame("p", "l", "f", 0.0, payload=data))[0]
    assert torch.equal(prepared.tiles, detector.preprocessor(full)[0])
