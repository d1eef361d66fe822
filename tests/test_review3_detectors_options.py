"""WinCLIP and randword options that would make NaN maps or fail the first frame are refused up front, where
`inspectd check` / `inspectd product put` see them; defect words are prompt text, never format fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.daemon.checks import check_product
from inspectd.daemon.config import ProductConfig
from inspectd.detectors import prompts as P
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def load_rgb(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


BAD_OPTIONS = [
    ("winclip", {"window_sizes": [0]}, "window_sizes"),  # was: every map and few-shot score NaN
    ("winclip", {"window_sizes": []}, "window_sizes"),  # was: IndexError on the first frame
    ("winclip", {"window_sizes": [2, 2]}, "window_sizes"),
    ("winclip", {"language_weight": 1.5}, "language_weight"),  # was: maps above mask_scale 1
    ("winclip", {"patch_feature": "cls"}, "patch_feature"),  # was: "max() arg is an empty sequence" at fit
    ("winclip", {"upsample": "cubic"}, "upsample"),  # was: NotImplementedError on the first frame
    ("winclip", {"eps": 0.0}, "eps"),
    ("winclip", {"logit_scale": -100.0}, "logit_scale"),  # would swap normal and anomalous
    ("winclip", {"multi_crop": 6}, "multi_crop"),  # was: ValueError on the first frame, naming no option
    ("randword", {"use_ffn": False, "multi_crop": 8}, "multi_crop"),
    ("randword", {"use_ffn": False, "temperature": 0.0}, "temperature"),  # was: refused only by the build
    ("randword", {"use_ffn": False, "use_prompt_score": False}, "use_ffn"),
]


@pytest.mark.parametrize(("detector", "options", "key"), BAD_OPTIONS)
def test_inspectd_check_reports_options_a_build_would_reject(detector: str, options: dict, key: str) -> None:
    product = ProductConfig(id="p", detector=detector, options=options, shots=0)
    problems = check_product(product, None, "products[0]")
    assert len(problems) == 1 and key in problems[0], problems


@pytest.mark.parametrize(("detector", "options", "key"), BAD_OPTIONS)
def test_creating_the_detector_names_the_bad_option(tiny_backbone: ClipBackbone, detector: str, options: dict,
                                                    key: str) -> None:
    with pytest.raises(ValueError, match=key):
        create_detector(detector, tiny_backbone, options)


def test_good_options_still_pass() -> None:
    for detector, options in [("winclip", {}), ("winclip", {"window_sizes": [3], "language_weight": 0.0,
                                                            "patch_feature": "raw", "upsample": "nearest",
                                                            "multi_crop": 5, "use_image_scale": False}),
                              ("randword", {"use_ffn": False, "multi_crop": 0, "temperature": 0.07})]:
        assert check_product(ProductConfig(id="p", detector=detector, options=options, shots=0), None, "p") == []


def test_a_window_wider_than_the_patch_grid_is_refused_with_the_grid(tiny_backbone: ClipBackbone) -> None:
    gh, gw = tiny_backbone.grid  # 15 x 15
    with pytest.raises(ValueError, match=rf"window_sizes .*{gh} x {gw}"):
        create_detector("winclip", tiny_backbone, {"window_sizes": [2, gh + 1]})
    det = create_detector("winclip", tiny_backbone, {"window_sizes": [gh]})  # one window covering the grid
    state = det.fit(ProductSpec("nut", "hazelnut"), [load_rgb(HAZELNUT / "good" / "00.png")])
    [out] = run([ScoreItem(det, state, load_rgb(HAZELNUT / "colour" / "00.png"))])
    assert np.isfinite(out.score) and np.isfinite(out.map).all()


# ----------------------------------------------------------------------------- defect words
def test_defect_words_with_braces_build_and_reach_the_prompts_verbatim(tiny_backbone: ClipBackbone) -> None:
    words = ("scratch {deep}", "{}", "50% {0}")
    det = create_detector("winclip", tiny_backbone)
    state = det.fit(ProductSpec("nut", "hazelnut", words), [])  # was: KeyError 'deep'
    anomalous = [t.replace("{}", s.replace("{}", "hazelnut"))
                 for s in P.WINCLIP_ANOMALOUS_STATES for t in P.WINCLIP_TEMPLATES]
    anomalous += [t.replace("{}", f"hazelnut with {w}") for w in words for t in P.WINCLIP_TEMPLATES]
    assert "a photo of the hazelnut with scratch {deep} for visual inspection." in anomalous
    embeddings = tiny_backbone.encode_text(anomalous).double()
    expected = embeddings.mean(dim=0) / embeddings.mean(dim=0).norm()
    torch.testing.assert_close(state.tensors["text_prototypes"][1].double(), expected, atol=1e-6, rtol=0)
    [out] = run([ScoreItem(det, state, load_rgb(HAZELNUT / "colour" / "01.png"))])
    assert np.isfinite(out.score)


def test_blank_defect_words_add_no_prompts(tiny_backbone: ClipBackbone) -> None:
    det = create_detector("winclip", tiny_backbone)
    clean = det.fit(ProductSpec("nut", "hazelnut", ("crack",)), [])
    padded = det.fit(ProductSpec("nut", "hazelnut", ("", "  crack ", " ")), [])  # was: "... hazelnut with ."
    torch.testing.assert_close(padded.tensors["text_prototypes"], clean.tensors["text_prototypes"], atol=0, rtol=0)
