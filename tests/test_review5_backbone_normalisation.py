"""Frames are normalised the way the loaded weights were trained: the model's own open_clip preprocess_cfg (a tag's,
a folder's open_clip_config.json, the release a file's name names), CLIP's OpenAI mean/std only as the fallback; and
a state built under one normalisation is never served under another."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.detectors.backbone import ClipBackbone, ModelSpec
from inspectd.detectors.base import create_detector
from inspectd.detectors.preprocess import CLIP_MEAN, CLIP_STD, InputSpec
from inspectd.detectors.tiny import register_tiny_arch, write_tiny_checkpoint

GOOD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut" / "good"
HALF = [0.5, 0.5, 0.5]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def checkpoint(root: Path, **preprocess: object) -> Path:
    """A tiny checkpoint folder (seed 0: the same weights each time) whose open_clip_config.json says ``preprocess``."""
    folder = write_tiny_checkpoint(root)
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["preprocess_cfg"].update(preprocess)
    config_path.write_text(json.dumps(config))
    return folder


def load(pretrained: Path) -> ClipBackbone:
    register_tiny_arch()
    return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(pretrained), device="cpu"))


def open_clip_pixels(folder: Path, image: Image.Image) -> torch.Tensor:
    """open_clip's own inference pre-processing of ``image`` for the model in ``folder``: the reference."""
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return preprocess(image)


@pytest.mark.parametrize("preprocess", [{"mean": HALF, "std": HALF},
                                        {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}])
def test_tiles_follow_the_checkpoints_own_normalisation(tmp_path: Path, preprocess: dict) -> None:
    folder = checkpoint(tmp_path / "ckpt", **preprocess)
    bb = load(folder)
    image = Image.open(GOOD / "00.png").convert("RGB")  # 512 x 512: one tile, resized as open_clip resizes it
    expected = open_clip_pixels(folder, image)
    for spec in (InputSpec(bb.image_size, "tile"), InputSpec(bb.image_size, "square")):
        tiles, layout = bb.preprocessor_for(spec)(np.asarray(image))
        assert layout.n_tiles == 1
        torch.testing.assert_close(tiles[0], expected, atol=1e-5, rtol=0)
    # pointing model.pretrained at the folder's weights file itself reads the same config
    by_file = load(folder / "open_clip_model.safetensors")
    torch.testing.assert_close(by_file.preprocessor(np.asarray(image))[0][0], expected, atol=1e-5, rtol=0)


def test_clip_normalisation_stays_the_default(tiny_backbone: ClipBackbone) -> None:
    pre = tiny_backbone.preprocessor
    torch.testing.assert_close(pre.mean.flatten(), torch.tensor(CLIP_MEAN))
    torch.testing.assert_close(pre.std.flatten(), torch.tensor(CLIP_STD))
    assert "normalisation" not in tiny_backbone.identity  # states built before keep their fingerprints


def test_normalisation_keys_the_state_cache(tmp_path: Path) -> None:
    clip = load(checkpoint(tmp_path / "clip"))
    half = load(checkpoint(tmp_path / "half", mean=HALF, std=HALF))
    assert clip.weights_id == half.weights_id  # the same tensors: only the config differs
    det_clip, det_half = create_detector("winclip", clip), create_detector("winclip", half)
    assert det_clip.preprocessor != det_half.preprocessor  # tiles made for one are not reused for the other
    assert det_clip.config_fingerprint() != det_half.config_fingerprint()


def test_a_release_file_name_brings_its_pretrained_normalisation(tmp_path: Path) -> None:
    """open_clip knows only the arch for a file: the release its name names says how it was trained (LAION's
    ViT-L-14 laion2b_s32b_b82k: mean = std = 0.5; CLIPA: ImageNet's, bilinear)."""
    from inspectd.detectors.backbone import normalisation
    from inspectd.detectors.weights import WeightsSource

    fetched = tmp_path / "ViT-L-14-laion2b_s32b_b82k.safetensors"  # what `inspectd weights fetch` writes
    assert normalisation("ViT-L-14", WeightsSource("file", str(fetched)), {}) == {
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    clipa = tmp_path / "ViT-L-14-CLIPA-datacomp1b.safetensors"
    assert normalisation("ViT-L-14-CLIPA", WeightsSource("file", str(clipa)), {}) == {
        "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD), "interpolation": "bilinear"}
    # a folder without open_clip_config.json holding such a file: the same
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(write_tiny_checkpoint(tmp_path / "t") / "open_clip_model.safetensors",
                folder / "ViT-L-14-laion2b_s32b_b82k.safetensors")
    assert normalisation("ViT-L-14", WeightsSource("dir", str(folder)), {})["mean"] == (0.5, 0.5, 0.5)
    other = tmp_path / "my-finetune.pt"
    assert normalisation("ViT-L-14", WeightsSource("file", str(other)), {})["mean"] == CLIP_MEAN
