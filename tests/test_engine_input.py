"""The engine pre-processes a frame for its product's own detector, and again (from the encoded bytes) when the
product was not serving yet or a hot swap changed the detector's input: the result is as if scored directly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.engine import ScoringEngine
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.preprocess import InputSpec
from inspectd.detectors.winclip import WinClip
from inspectd.streams.schema import Frame

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


class SquareWinClip(WinClip):
    name = "test-engine-square"

    def input_spec(self) -> InputSpec:
        return InputSpec(288, "square")


def frame_of(path: Path, size: tuple[int, int]) -> tuple[Frame, np.ndarray]:
    image = Image.open(path).convert("RGB").resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Frame("nut", "l1", "f1", 0.0, payload=buffer.getvalue()), np.asarray(image)


async def test_prepared_for_the_products_detector_and_redone_after_an_input_change(tiny_backbone) -> None:
    engine = ScoringEngine([tiny_backbone.device], decode_threads=0)
    tiled, square = create_detector("winclip", tiny_backbone), SquareWinClip(tiny_backbone)
    state = tiled.fit(ProductSpec("nut", "hazelnut"), [])
    try:
        frame, rgb = frame_of(HAZELNUT / "colour" / "01.png", (400, 260))
        [prepared] = await engine.prepare([frame], lambda product: tiled if product == "nut" else None)
        assert prepared.input_spec == InputSpec(240, "tile") and prepared.tiles.shape[0] == 2
        assert frame.payload is not None  # kept until scored: a swap may need another input

        # the serving detector changed (hot swap) between prepare and score: re-prepared for the new one
        item = ScoreItem(square, state, tiles=prepared.tiles, layout=prepared.layout, input_spec=prepared.input_spec)
        [out], _ = await engine.score([item], [frame])
        assert item.tiles.shape == (1, 3, 288, 288) and frame.payload is None
        [direct] = run([ScoreItem(square, state, rgb)])
        assert out.score == pytest.approx(direct.score, abs=1e-6)
        np.testing.assert_allclose(out.map, direct.map, atol=1e-6)

        # a frame whose product was not serving at prepare time is decoded only, then prepared at score time
        frame2, rgb2 = frame_of(HAZELNUT / "good" / "03.png", (240, 240))
        [unknown] = await engine.prepare([frame2], lambda product: None)
        assert unknown.tiles is None and unknown.size == (240, 240)
        [out2], _ = await engine.score([ScoreItem(tiled, state)], [frame2])
        [direct2] = run([ScoreItem(tiled, state, rgb2)])
        assert out2.score == pytest.approx(direct2.score, abs=1e-6)
        assert out2.map.shape == (240, 240)
    finally:
        engine.close()
