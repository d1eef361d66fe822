"""Backbone: loading through the real path, clear errors, window embeddings by token dropping, tiling."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from inspectd.detectors import weights
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec, window_indices
from inspectd.detectors.preprocess import Preprocessor, tile_offsets
from inspectd.detectors.tiny import write_tiny_checkpoint


def naive_window_embeddings(backbone: ClipBackbone, pixels: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: full sequence through the transformer with an attention mask that lets each window's
    tokens (and CLS) see only each other; one masked full pass per window."""
    visual = backbone.visual
    tokens = visual._embeds(pixels)  # [N, 1+L, W]
    n, length, _ = tokens.shape
    gh, gw = backbone.grid
    outputs = []
    for image in range(n):
        per_window = []
        for top in range(gh - k + 1):
            for left in range(gw - k + 1):
                keep = torch.zeros(length, dtype=torch.bool)
                keep[0] = True
                for dy in range(k):
                    for dx in range(k):
                        keep[1 + (top + dy) * gw + (left + dx)] = True
                allowed = keep[:, None] & keep[None, :]
                allowed |= torch.eye(length, dtype=torch.bool)  # dropped tokens see only themselves
                mask = torch.zeros(length, length)
                mask[~allowed] = float("-inf")
                x = visual.transformer(tokens[image:image + 1], attn_mask=mask)
                per_window.append(backbone._project(x[:, 0])[0])
        outputs.append(torch.stack(per_window))
    return torch.stack(outputs)


@pytest.mark.parametrize("image_size", [96, 144])
@pytest.mark.parametrize("k", [2, 3])
def test_window_embeddings_equal_masked_full_pass(tmp_path: Path, image_size: int, k: int) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", image_size=image_size, seed=1)
    backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(ckpt), device="cpu"))
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.inference_mode():
        fast = backbone.forward(pixels, FeatureRequest(windows=frozenset({k}))).windows[k]
        slow = naive_window_embeddings(backbone, pixels, k)
    grid = image_size // 16
    assert fast.shape == (2, (grid - k + 1) ** 2, backbone.embed_dim)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_window_chunking_does_not_change_results(tiny_checkpoint: Path) -> None:
    pixels = torch.randn(3, 3, 240, 240)
    big = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu"))
    small = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                   window_chunk_tokens=100))
    a = big.forward(pixels, FeatureRequest(windows=frozenset({2, 3})))
    b = small.forward(pixels, FeatureRequest(windows=frozenset({2, 3})))
    for k in (2, 3):
        torch.testing.assert_close(a.windows[k], b.windows[k], atol=1e-5, rtol=1e-5)


def test_window_indices_cover_grid() -> None:
    idx = window_indices(4, 5, 2)
    assert idx.shape == (3 * 4, 4)
    assert idx[0].tolist() == [0, 1, 5, 6]
    assert idx[-1].tolist() == [13, 14, 18, 19]


def test_image_embedding_matches_open_clip_encode_image(tiny_backbone: ClipBackbone) -> None:
    pixels = torch.randn(2, 3, 240, 240)
    feats = tiny_backbone.forward(pixels, FeatureRequest(patch_tokens=True, patch_embeddings=True,
                                                         blocks=frozenset({0})))
    with torch.inference_mode():
        reference = tiny_backbone.model.encode_image(pixels)
    torch.testing.assert_close(feats.image_embeddings, reference, atol=1e-5, rtol=1e-5)
    assert feats.patch_tokens.shape == (2, 225, tiny_backbone.width)
    assert feats.patch_embeddings.shape == (2, 225, tiny_backbone.embed_dim)
    assert feats.blocks[0].shape == (2, 225, tiny_backbone.width)


def test_missing_checkpoint_path_is_a_clear_error_without_network(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    missing = tmp_path / "weights" / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"
    with pytest.raises(weights.WeightsNotFoundError) as info:
        ClipBackbone(ModelSpec(arch="ViT-B-16-plus-240", pretrained=str(missing), device="cpu"))
    message = str(info.value)
    assert "inspectd weights fetch ViT-B-16-plus-240" in message
    assert "inspectd weights verify" in message
    assert str(missing) in message


def test_unreachable_tag_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(weights.WeightsNotFoundError) as info:
        ClipBackbone(ModelSpec(arch="ViT-B-16-plus-240", pretrained="laion400m_e31", device="cpu",
                               cache_dir=str(tmp_path)))
    assert "vit_b_16_plus_240-laion400m_e31-8fb26589.pt" in str(info.value)
    assert "inspectd weights fetch ViT-B-16-plus-240 laion400m_e31" in str(info.value)


def test_random_weights_need_demo_flag() -> None:
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    with pytest.raises(weights.RandomWeightsNotAllowed):
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", device="cpu"))
    demo = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained="random", device="cpu", demo=True))
    assert demo.demo_weights is True


def test_quick_gelu_forced_for_openai_weights(tmp_path: Path) -> None:
    from inspectd.detectors.backbone import _wants_quick_gelu

    spec = ModelSpec(arch="ViT-B-16", pretrained="openai")
    assert _wants_quick_gelu(spec, weights.WeightsSource("tag", "openai"))
    assert not _wants_quick_gelu(ModelSpec(arch="ViT-B-16", pretrained="laion2b_s34b_b88k"),
                                 weights.WeightsSource("tag", "laion2b_s34b_b88k"))
    assert not _wants_quick_gelu(ModelSpec(arch="ViT-B-16-quickgelu", pretrained="openai"),
                                 weights.WeightsSource("tag", "openai"))
    assert _wants_quick_gelu(ModelSpec(arch="ViT-B-16", pretrained="/w/ViT-B-16-openai.pt"),
                             weights.WeightsSource("file", "/w/ViT-B-16-openai.pt"))
    forced = ModelSpec(arch="x", pretrained="/p", quick_gelu="true")
    assert _wants_quick_gelu(forced, weights.WeightsSource("file", "/p"))


def test_quick_gelu_reaches_the_model(tmp_path: Path) -> None:
    import open_clip

    ckpt = write_tiny_checkpoint(tmp_path / "tiny", image_size=96)
    model_default = ClipBackbone(ModelSpec(arch="x", pretrained=str(ckpt), device="cpu")).model
    model_quick = ClipBackbone(ModelSpec(arch="x", pretrained=str(ckpt), device="cpu", quick_gelu="true")).model
    act = type(model_quick.visual.transformer.resblocks[0].mlp.gelu)
    assert act is open_clip.transformer.QuickGELU
    assert type(model_default.visual.transformer.resblocks[0].mlp.gelu) is not open_clip.transformer.QuickGELU


def test_verify_checks_sha256(tmp_path: Path) -> None:
    import hashlib

    payload = b"not really a checkpoint"
    digest = hashlib.sha256(payload).hexdigest()
    good = tmp_path / f"model-{digest[:8]}.pt"
    good.write_bytes(payload)
    assert weights.verify(good)[0] is True
    bad = tmp_path / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"
    bad.write_bytes(payload)
    ok, message = weights.verify(bad)
    assert ok is False and "MISMATCH" in message
    unknown = tmp_path / "mystery.bin"
    unknown.write_bytes(payload)
    assert weights.verify(unknown)[0] is None


def test_text_cache_returns_same_tensor(tiny_backbone: ClipBackbone) -> None:
    a = tiny_backbone.encode_text(["a photo of a nut.", "a photo of a damaged nut."])
    b = tiny_backbone.encode_text(["a photo of a nut.", "a photo of a damaged nut."])
    assert a is b
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))


def test_tile_offsets_stride_bound() -> None:
    for length in range(240, 1200, 37):
        offsets = tile_offsets(length, 240)
        assert offsets[0] == 0 and offsets[-1] == max(0, length - 240)
        assert all(b - a <= 0.8 * 240 for a, b in zip(offsets, offsets[1:], strict=False))


def test_square_image_is_one_resized_tile() -> None:
    pre = Preprocessor(240)
    image = np.random.default_rng(0).integers(0, 255, (480, 480, 3), dtype=np.uint8)
    tiles, layout = pre(image)
    assert tiles.shape == (1, 3, 240, 240) and layout.resized == (240, 240)


def test_non_square_map_is_average_of_overlapping_tiles() -> None:
    pre = Preprocessor(240)
    image = np.zeros((300, 700, 3), dtype=np.uint8)
    tiles, layout = pre(image)
    assert layout.resized == (240, 560)
    assert tiles.shape[0] == len(layout.offsets) == 3  # stride (560-240)/2 = 160 <= 192
    tile_maps = torch.stack([torch.full((240, 240), float(i + 1)) for i in range(3)])
    merged = pre.merge_maps(tile_maps, layout, out_size=layout.resized)
    assert merged.shape == (240, 560)
    # columns covered by tile 0 only, by tiles 0+1, by tiles 1+2, by tile 2 only
    assert merged[0, 0].item() == 1.0
    assert merged[0, 170].item() == pytest.approx(1.5)
    assert merged[0, 350].item() == pytest.approx(2.5)
    assert merged[0, 400].item() == 3.0
    assert merged[0, 559].item() == 3.0
    full = pre.merge_maps(tile_maps, layout)
    assert full.shape == (300, 700)


def test_weights_cli_verify_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from inspectd.cli import main

    payload = b"checkpoint bytes"
    good = tmp_path / f"x-{hashlib.sha256(payload).hexdigest()[:8]}.pt"
    good.write_bytes(payload)
    assert main(["weights", "verify", str(good)]) == 0
    bad = tmp_path / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"
    bad.write_bytes(payload)
    assert main(["weights", "verify", str(bad)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["weights", "list"]) == 0
    assert "laion400m_e31" in capsys.readouterr().out


def test_weights_fetch_rejects_unknown_checkpoint(tmp_path: Path) -> None:
    from inspectd.cli import main

    assert main(["weights", "fetch", "ViT-B-16-plus-240", "no_such_tag_xyz", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_trimmed_text_encoding_equals_open_clip(tiny_backbone: ClipBackbone) -> None:
    prompts = ["a photo of a flawless hazelnut for visual inspection.", "x", "a jpeg corrupted photo of the grid."]
    tokens = tiny_backbone.tokenizer(prompts)
    with torch.inference_mode():
        reference = tiny_backbone.model.encode_text(tokens)
        trimmed = tiny_backbone._encode_tokens(tokens)
    torch.testing.assert_close(trimmed, reference, atol=1e-5, rtol=1e-5)


def test_batch_pixels_on_the_cpu_is_one_concatenation(tiny_backbone: ClipBackbone) -> None:
    views = [torch.randn(n, 3, 240, 240) for n in (1, 2, 1)]
    batch = tiny_backbone.batch_pixels(views)
    assert batch.device.type == "cpu" and torch.equal(batch, torch.cat(views))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_pixels_on_a_gpu_come_through_pinned_memory(tiny_checkpoint: Path) -> None:
    backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cuda"))
    views = [torch.randn(n, 3, 240, 240) for n in (1, 3)]
    seen = []
    original = torch.Tensor.to

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append((self.is_pinned(), kwargs.get("non_blocking")))
        return original(self, *args, **kwargs)

    torch.Tensor.to = spy  # type: ignore[method-assign]
    try:
        batch = backbone.batch_pixels(views)
    finally:
        torch.Tensor.to = original  # type: ignore[method-assign]
    assert seen == [(True, True)]
    torch.cuda.synchronize()
    assert batch.is_cuda and torch.equal(batch.cpu(), torch.cat(views))
    cpu = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu"))
    gpu_out = backbone.forward(batch, FeatureRequest()).image_embeddings.cpu()
    cpu_out = cpu.forward(torch.cat(views), FeatureRequest()).image_embeddings
    np.testing.assert_allclose(gpu_out.numpy(), cpu_out.numpy(), atol=1e-3)
