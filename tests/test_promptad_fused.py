"""PromptAD's V-V tower on the oneDNN fused blocks (fused.FusedBlocks.dual_block): the same maths as open_clip's
blocks block by block (GELU, QuickGELU, LayerScale), the same features, maps and scores on the tiny checkpoint and on
a seeded random ViT-B-16-plus-240, and open_clip's blocks kept where gradients are wanted or kernels are "torch".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from PIL import Image

from inspectd.detectors import fused
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features, ModelSpec
from inspectd.detectors.base import ProductSpec, ProductState, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.promptad.tower import TOWER, dual_block, vv_forward
from tests.daemon_helpers import HAZELNUT
from tests.test_fused import random_transformer

pytestmark = pytest.mark.skipif(not fused.available(), reason="torch built without oneDNN")

SPEC = ProductSpec("hazelnut", "hazelnut")
VARIANTS = {
    "gelu": {},
    "quick_gelu": {"act_layer": QuickGELU},
    "layer_scale": {"ls_init_value": 0.5},
}


def load(folder: str, names: range | list[int]) -> list[np.ndarray]:
    return [np.asarray(Image.open(HAZELNUT / folder / f"{i:02d}.png").convert("RGB")) for i in names]


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int | str]]:
    """Block indices every `FusedBlocks.dual_block` call ran, and "cls" for a `dual_cls_block` call (which path a
    forward took)."""
    calls: list[int | str] = []
    original, original_cls = fused.FusedBlocks.dual_block, fused.FusedBlocks.dual_cls_block

    def spy(self: fused.FusedBlocks, i: int, x: torch.Tensor, x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(i)
        return original(self, i, x, x_vv)

    def spy_cls(self: fused.FusedBlocks, x: torch.Tensor, x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append("cls")
        return original_cls(self, x, x_vv)

    monkeypatch.setattr(fused.FusedBlocks, "dual_block", spy)
    monkeypatch.setattr(fused.FusedBlocks, "dual_cls_block", spy_cls)
    yield calls


def assert_same_features(a: Features, b: Features, atol: float) -> None:
    torch.testing.assert_close(a.image_embeddings, b.image_embeddings, atol=atol, rtol=1e-5)
    torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, atol=atol, rtol=1e-5)
    if b.patch_tokens is not None:
        torch.testing.assert_close(a.patch_tokens, b.patch_tokens, atol=atol, rtol=1e-5)
    assert set(a.blocks) == set(b.blocks)
    for i in b.blocks:
        torch.testing.assert_close(a.blocks[i], b.blocks[i], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("gemm", ["onednn", "blas"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("length", [5, 26])
def test_fused_dual_block_equals_the_open_clip_dual_block(variant: str, length: int, gemm: str) -> None:
    model = random_transformer(3, **VARIANTS[variant])
    assert fused.support(model, torch.float32) is None
    blocks = fused.FusedBlocks(model, rows_hint=64, gemm=gemm)
    x, x_vv = torch.randn(7, length, 64), torch.randn(7, length, 64)  # x_vv apart from x: its own residual
    with torch.inference_mode():
        for i, block in enumerate(model.resblocks):
            expected, increment = dual_block(block, x)
            got, got_vv = blocks.dual_block(i, x, x_vv)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got_vv, x_vv + increment, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got, blocks.block(i, x), atol=0, rtol=0)  # the original path is the block
            x, x_vv = expected, x_vv + increment



def test_fused_dual_block_bf16_close_to_fp32() -> None:
    model = random_transformer(2)
    if reason := fused.support(model, torch.bfloat16):
        pytest.skip(reason)
    x = torch.randn(5, 10, 64)
    with torch.inference_mode():
        expected, increment = dual_block(model.resblocks[0], x)
        blocks = fused.FusedBlocks(model.to(torch.bfloat16), rows_hint=64)
        got, got_vv = blocks.dual_block(0, x.bfloat16(), x.bfloat16())
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got_vv.float() - (x + increment)).abs().max() < 0.05 * (x + increment).abs().max()

def test_promptad_on_fused_blocks_equals_the_open_clip_path(tiny_checkpoint: Path, fused_calls: list[int]) -> None:
    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu"))
    plain = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                   cpu_kernels="torch"))
    assert fast.fused_blocks is not None and plain.fused_blocks is None  # the tiny model runs fused
    depth = len(fast.visual.transformer.resblocks)
    pixels = torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    request = FeatureRequest(tower=TOWER, blocks=frozenset(range(depth)), patch_tokens=True, patch_embeddings=True)
    a = fast.forward(pixels, request)
    assert fused_calls == list(range(depth))
    b = plain.forward(pixels, request)
    assert fused_calls == list(range(depth))  # cpu_kernels: torch -> open_clip's blocks
    assert_same_features(a, b, atol=1e-5)

    refs = load("good", range(4))
    on_fast = create_detector("promptad", fast, {"steps": 3})
    on_plain = create_detector("promptad", plain, {"steps": 3})
    state = on_plain.fit(SPEC, refs)
    fast_state = on_fast.fit(SPEC, refs)  # the references go through the fused tower here
    for name, tensor in state.tensors.items():
        torch.testing.assert_close(fast_state.tensors[name], tensor, atol=1e-4, rtol=1e-4)
    frames = load("colour", [0, 1, 2]) + load("good", [10])
    for scored_state in (state, fast_state):
        new = run([ScoreItem(on_fast, scored_state, f) for f in frames])
        old = run([ScoreItem(on_plain, state, f) for f in frames])
        for x, y in zip(new, old, strict=True):
            assert x.score == pytest.approx(y.score, abs=1e-4)
            np.testing.assert_allclose(x.map, y.map, atol=1e-4, rtol=0)


@pytest.mark.parametrize("gemm", ["onednn", "blas"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("length", [5, 26])
def test_fused_dual_cls_block_equals_the_dual_block_on_token_0(variant: str, length: int, gemm: str) -> None:
    model = random_transformer(4, **VARIANTS[variant])
    blocks = fused.FusedBlocks(model, rows_hint=64, gemm=gemm)
    x, x_vv = torch.randn(7, length, 64), torch.randn(7, length, 64)
    with torch.inference_mode():
        expected, increment = dual_block(model.resblocks[-1], x)
        cls, got_vv = blocks.dual_cls_block(x, x_vv)
    assert cls.shape == (7, 1, 64)
    torch.testing.assert_close(cls[:, 0], expected[:, 0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_vv, x_vv + increment, atol=2e-5, rtol=2e-5)


def test_last_block_runs_the_original_path_for_cls_only_when_it_is_not_a_memory_tap(
        tiny_checkpoint: Path, fused_calls: list[int | str]) -> None:
    """Without a tap on the last block only the original path's CLS token leaves it (`dual_cls_block`): the same
    image embedding and V-V patch features as open_clip's blocks; with the tap, every block runs whole."""
    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu"))
    plain = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                   cpu_kernels="torch"))
    depth = len(fast.visual.transformer.resblocks)
    pixels = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(3))
    untapped = FeatureRequest(tower=TOWER, blocks=frozenset({0}), patch_tokens=True, patch_embeddings=True)
    got = fast.forward(pixels, untapped)
    assert fused_calls == [*range(depth - 1), "cls"]
    assert_same_features(got, plain.forward(pixels, untapped), atol=1e-5)
    fused_calls.clear()
    fast.forward(pixels, FeatureRequest(tower=TOWER, blocks=frozenset({depth - 1}), patch_embeddings=True))
    assert fused_calls == list(range(depth))


def test_gradients_take_open_clip_blocks(tiny_backbone: Any, fused_calls: list[int]) -> None:
    """The fused kernels are not differentiable: a forward that needs gradients runs open_clip's blocks."""
    assert tiny_backbone.fused_blocks is not None
    request = FeatureRequest(tower=TOWER, patch_embeddings=True)
    pixels = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = vv_forward(tiny_backbone, pixels, request)
    assert fused_calls  # no gradient wanted: fused
    fused_calls.clear()
    leaf = pixels.clone().requires_grad_()
    out = vv_forward(tiny_backbone, leaf, request)
    assert not fused_calls
    torch.testing.assert_close(out.patch_embeddings.detach(), reference.patch_embeddings, atol=1e-5, rtol=1e-5)
    out.patch_embeddings.square().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    vv_forward(tiny_backbone, pixels, request)  # grad mode on, but nothing requires grad: fused is fine
    assert fused_calls


def test_vit_b_16_plus_240_fused_maps_and_scores_equal_open_clip() -> None:
    """A seeded random ViT-B-16-plus-240 (as bench/common.py `load_model`): 14 heads of 64, 12 blocks. The slowest
    test here (~3 s on an idle 2-core CPU, ~10 s on a busy one: the model build and four ViT-B forwards). The state
    is synthetic (random text prototypes, the memory of two open_clip-path references): scoring is compared, not a
    fit."""
    backbone = ClipBackbone(ModelSpec(arch="ViT-B-16-plus-240", pretrained="random", device="cpu", demo=True))
    assert fused.support(backbone.visual.transformer, backbone.dtype) is None
    fused_blocks = backbone.fused_blocks
    detector = create_detector("promptad", backbone, {"steps": 1})
    request = detector.feature_request()
    frames = load("colour", [0]) + load("good", [10])
    pixels = torch.cat([detector.preprocessor(f)[0] for f in frames])
    references = torch.cat([detector.preprocessor(f)[0] for f in load("good", [0, 1])])
    backbone.fused_blocks = None  # open_clip's blocks
    try:
        memory = backbone.forward(references, request)
        expected = backbone.forward(pixels, request)
    finally:
        backbone.fused_blocks = fused_blocks
    got = backbone.forward(pixels, request)
    assert_same_features(got, expected, atol=1e-4)
    text = torch.randn(2, 2, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    tensors = {"text_image": F.normalize(text[0], dim=-1), "text_pixel": F.normalize(text[1], dim=-1)}
    for b in detector.blocks:
        tokens = memory.blocks[b]
        tensors[f"memory_block_{b}"] = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)
    state = ProductState("promptad", tensors)
    new, old = detector.score(got, state), detector.score(expected, state)
    torch.testing.assert_close(new.scores, old.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(new.maps, old.maps, atol=1e-4, rtol=0)
    assert (old.maps.max() - old.maps.min()) > 1e-3  # the maps are not flat: the comparison means something
