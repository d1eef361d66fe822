"""PromptAD's manual anomaly prompts take defect words and object names as text: braces reach the prompts verbatim
(they were format fields: a KeyError failed the build) and blank words add no prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.promptad import prompts as PP

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("object_name", ["hazelnut", "nut {x}"])
def test_promptad_builds_with_braces_in_defect_words_and_the_object_name(tiny_backbone: ClipBackbone,
                                                                         object_name: str) -> None:
    det = create_detector("promptad", tiny_backbone, {"steps": 1, "builtin_suffixes": False})
    words = ("scratch {deep}", "{}", "50% {0}", "  ", "")
    state = det.fit(ProductSpec("nut", object_name, words), [load_rgb(HAZELNUT / "good" / "00.png")])  # was: KeyError
    manual = state.meta["prompts"]["image"]["manual"]
    prefix = " ".join(["N"] * det.options.n_ctx)
    expected = [f"{prefix} {s.replace('{}', object_name)}." for s in PP.GENERIC_SUFFIXES["paper"]]
    expected += [f"{prefix} {object_name} with {w}." for w in ("scratch {deep}", "{}", "50% {0}")]
    assert manual == expected  # verbatim, one per non-blank word
    assert state.meta["prompts"]["image"]["normal"] == [f"{prefix} {object_name}."]
    [out] = run([ScoreItem(det, state, load_rgb(HAZELNUT / "colour" / "00.png"))])
    assert np.isfinite(out.score) and np.isfinite(out.map).all()


def test_defect_words_become_the_same_suffixes_as_plain_text() -> None:
    plain = PP.anomaly_suffixes("nut", "hazelnut", ["crack", " dent "], builtin=False)
    assert plain[-2:] == ("{} with crack", "{} with dent")
    braced = PP.anomaly_suffixes("nut", "hazelnut", ["a {b}", "{", "}"], builtin=False)
    assert [s.format("nut") for s in braced[-3:]] == ["nut with a {b}", "nut with {", "nut with }"]
