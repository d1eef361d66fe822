"""Backbone capabilities the learned detectors need: inputs of other sizes, square inputs, deep visual prompts,
the differentiable text path, the bounded text cache, seeded demo weights, one forward per input group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inspectd.detectors import backbone as backbone_mod
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.preprocess import InputSpec
from inspectd.detectors.winclip import WinClip

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(HAZELNUT / name).convert("RGB"))


class SquareWinClip(WinClip):
    """WinCLIP fed one square resize at 320 px (APRIL-GAN-style input) instead of tiles at the model's size."""

    name = "test-square-winclip"

    def input_spec(self) -> InputSpec:
        return InputSpec(320, "square")


def test_positions_at_the_trained_grid_are_the_trained_ones(tiny_backbone: ClipBackbone) -> None:
    torch.testing.assert_close(tiny_backbone._positions(tiny_backbone.grid),
                               tiny_backbone.visual.positional_embedding.detach(), atol=1e-5, rtol=0)


def test_another_input_size_runs_with_interpolated_positions(tiny_backbone: ClipBackbone) -> None:
    pixels = torch.randn(2, 3, 320, 320)
    feats = tiny_backbone.forward(pixels, FeatureRequest(patch_tokens=True, windows=frozenset({2})))
    assert feats.grid == (20, 20) and feats.patch_tokens.shape[1] == 400
    assert feats.windows[2].shape[1] == 19 * 19
    same = tiny_backbone.forward(torch.randn(1, 3, 240, 240), FeatureRequest(patch_tokens=True))
    assert same.grid == tiny_backbone.grid


def test_square_input_detector_scores_a_non_square_frame_in_one_input(tiny_backbone: ClipBackbone) -> None:
    det = SquareWinClip(tiny_backbone)
    frame = np.asarray(Image.fromarray(rgb("colour/00.png")).resize((480, 300)))
    state = det.fit(ProductSpec("nut", "hazelnut"), [rgb("good/00.png")])
    item = ScoreItem(det, state, frame)
    [out] = run([item])
    assert item.tiles.shape == (1, 3, 320, 320) and item.layout.n_tiles == 1
    assert out.map.shape == (300, 480) and np.isfinite(out.map).all()
    # the tiled detector on the same frame needs 2 tiles: the input really is the detector's choice
    tiled = ScoreItem(create_detector("winclip", tiny_backbone), state, frame)
    run([tiled])
    assert tiled.tiles.shape[0] == 2 and tiled.tiles.shape[-1] == 240


def test_one_forward_per_input_group(tiny_backbone: ClipBackbone) -> None:
    square, tiled = SquareWinClip(tiny_backbone), create_detector("winclip", tiny_backbone)
    nut = tiled.fit(ProductSpec("nut", "hazelnut"), [])
    grid = tiled.fit(ProductSpec("grid", "grid"), [])
    frames = [rgb("good/01.png"), rgb("colour/02.png")]
    before = tiny_backbone.forwards
    together = run([ScoreItem(tiled, nut, frames[0]), ScoreItem(tiled, grid, frames[1])])
    assert tiny_backbone.forwards - before == 1  # two products, one model, one input: one forward
    before = tiny_backbone.forwards
    mixed = run([ScoreItem(tiled, nut, frames[0]), ScoreItem(square, nut, frames[1])])
    assert tiny_backbone.forwards - before == 2  # two input sizes: two forwards
    [alone] = run([ScoreItem(tiled, nut, frames[0])])
    assert together[0].score == pytest.approx(alone.score, abs=1e-6) == pytest.approx(mixed[0].score, abs=1e-6)


def test_visual_prompts_tower_matches_a_manual_prompted_pass(tiny_backbone: ClipBackbone) -> None:
    visual = tiny_backbone.visual
    width, layers, n_prompts = tiny_backbone.width, 2, 3
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randn(2, layers, n_prompts, width, generator=gen) * 0.1
    pixels = torch.randn(2, 3, 240, 240, generator=gen)
    request = FeatureRequest(patch_tokens=True, blocks=frozenset({0}), tower="visual_prompts")
    feats = tiny_backbone.forward(pixels, request, {"visual_prompts": prompts})
    for row in range(2):
        with torch.no_grad():
            tokens = tiny_backbone._embed_tokens(pixels[row:row + 1])
            x = torch.cat([tokens[:, :1], prompts[row:row + 1, 0], tokens[:, 1:]], dim=1)
            for i, block in enumerate(visual.transformer.resblocks):
                if 0 < i < layers:
                    x[:, 1:1 + n_prompts] = prompts[row:row + 1, i]
                x = block(x)
                if i == 0:
                    block0 = x[:, 1 + n_prompts:]
            last = visual.ln_post(torch.cat([x[:, :1], x[:, 1 + n_prompts:]], dim=1))
        torch.testing.assert_close(feats.image_embeddings[row], (last[0, 0] @ visual.proj), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats.patch_tokens[row], last[0, 1:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats.blocks[0][row], block0[0], atol=1e-5, rtol=1e-4)
    plain = tiny_backbone.forward(pixels, FeatureRequest())
    assert not torch.allclose(plain.image_embeddings, feats.image_embeddings, atol=1e-4)  # prompts matter
    with pytest.raises(ValueError, match="row_inputs"):
        tiny_backbone.forward(pixels, request)


def test_visual_prompts_carry_gradients_for_training(tiny_backbone: ClipBackbone) -> None:
    prompts = torch.zeros(1, 2, 2, tiny_backbone.width, requires_grad=True)
    feats = tiny_backbone.prompted_forward(torch.randn(1, 3, 240, 240), FeatureRequest(), prompts)
    feats.image_embeddings.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_requests_for_different_towers_do_not_merge() -> None:
    with pytest.raises(ValueError, match="tower"):
        FeatureRequest() | FeatureRequest(tower="visual_prompts")
    assert (FeatureRequest(windows=frozenset({2})) | FeatureRequest(patch_tokens=True)).tower == "plain"


def test_unknown_tower_is_a_clear_error_and_registered_towers_run(tiny_backbone: ClipBackbone) -> None:
    pixels = torch.randn(1, 3, 240, 240)
    with pytest.raises(ValueError, match="unknown tower variant 'nope'"):
        tiny_backbone.forward(pixels, FeatureRequest(tower="nope"))
    seen = []

    def doubled(bb, px, request, rows):  # noqa: ANN001, ANN202
        seen.append(px.shape[0])
        out = bb._plain(px, FeatureRequest())
        out.image_embeddings = out.image_embeddings * 2
        return out

    backbone_mod.register_tower("test-doubled", doubled)
    try:
        feats = tiny_backbone.forward(pixels, FeatureRequest(tower="test-doubled"))
        plain = tiny_backbone.forward(pixels, FeatureRequest())
        torch.testing.assert_close(feats.image_embeddings, plain.image_embeddings * 2)
        assert seen == [1]
    finally:
        backbone_mod._TOWERS.pop("test-doubled")


def test_differentiable_text_path_equals_encode_text_and_learns(tiny_backbone: ClipBackbone) -> None:
    prompts = ["a photo of a flawless hazelnut", "a photo of a damaged hazelnut"]
    tokens, embeddings = tiny_backbone.tokenize(prompts)
    features = tiny_backbone.encode_text_embeddings(embeddings, tokens.argmax(dim=-1))
    torch.testing.assert_close(F.normalize(features, dim=-1), tiny_backbone.encode_text(prompts), atol=1e-5,
                               rtol=1e-4)
    # learnable context: replace the words after the start token, gradients reach it
    context = torch.zeros(4, tiny_backbone.width, requires_grad=True)
    learned = torch.cat([embeddings[:, :1], context[None].expand(2, -1, -1), embeddings[:, 5:]], dim=1)
    out = tiny_backbone.encode_text_embeddings(learned, tokens.argmax(dim=-1))
    out.sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())  # the tower stays frozen


def test_text_cache_is_bounded(tiny_backbone: ClipBackbone, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone_mod, "TEXT_CACHE_ENTRIES", 3)
    tiny_backbone._text_cache.clear()
    for i in range(10):
        tiny_backbone.encode_text([f"a photo of object {i}"])
    assert len(tiny_backbone._text_cache) == 3
    assert ("a photo of object 9",) in tiny_backbone._text_cache
    assert ("a photo of object 0",) not in tiny_backbone._text_cache


def test_demo_random_weights_are_seeded() -> None:
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    a = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", device="cpu", demo=True))
    b = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", device="cpu", demo=True))
    c = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", device="cpu", demo=True, seed=1))
    pa, pb, pc = (next(x.model.visual.parameters()) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.weights_id == b.weights_id == "random:seed=0" != c.weights_id


def test_weights_identity_is_the_checkpoint_content(tiny_backbone: ClipBackbone, tiny_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    import shutil

    moved = shutil.copytree(tiny_checkpoint, tmp_path / "elsewhere" / tiny_checkpoint.name)
    other = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(moved), device="cpu"))
    assert other.weights_id == tiny_backbone.weights_id and other.identity == tiny_backbone.identity
    det_a, det_b = create_detector("winclip", tiny_backbone), create_detector("winclip", other)
    assert det_a.config_fingerprint() == det_b.config_fingerprint()  # same weights: same cache key
