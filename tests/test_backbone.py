"""Backbone: loading through the real path, clear errors, window embeddings by token dropping, tiling."""

from __future__ import annotations

import shutil
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
    unknown = tmp_path / "ViT-B-16-plus-240-laion400m_e31.safetensors"  # fetch's name, its .sha256 note left behind
    unknown.write_bytes(payload)
    assert main(["weights", "verify", str(unknown)]) == 3  # nothing vouched for it: not a pass
    assert "nothing to compare against" in capsys.readouterr().out
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


# ------------------------------------------------------------------------------------------ unloadable checkpoints
def _bad_checkpoints(root: Path) -> dict[str, tuple[str, Path, Path]]:
    """name -> (arch, model.pretrained, the file the message must name)."""
    from safetensors.torch import load_file

    good = write_tiny_checkpoint(root / "good", seed=0)
    weights_file = good / "open_clip_model.safetensors"
    cases = {}
    trunc = root / "trunc.safetensors"
    trunc.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    cases["truncated safetensors"] = ("inspectd-tiny", trunc, trunc)
    pt = root / "trunc.pt"
    torch.save(load_file(str(weights_file)), pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    cases["truncated pt"] = ("inspectd-tiny", pt, pt)
    html = root / "page.bin"
    html.write_text("<html>404 Not Found</html>")
    cases["html as bin"] = ("inspectd-tiny", html, html)
    folder = root / "dir_trunc"
    shutil.copytree(good, folder)
    (folder / "open_clip_model.safetensors").write_bytes(b"\0" * 100)
    cases["hub folder, damaged weights"] = ("inspectd-tiny", folder, folder / "open_clip_model.safetensors")
    cases["another arch"] = ("ViT-B-16", weights_file, weights_file)
    return cases


def test_unloadable_checkpoints_name_the_file_the_arch_and_verify(tmp_path: Path) -> None:
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    for name, (arch, pretrained, named) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(weights.WeightsLoadError) as info:
            ClipBackbone(ModelSpec(arch=arch, pretrained=str(pretrained), device="cpu"))
        message = str(info.value)
        assert str(named) in message and repr(arch) in message, (name, message)
        assert f"inspectd weights verify {named}" in message, (name, message)
        assert "weights_only=false" not in message.lower() and "set to `false`" not in message.lower(), message
    assert isinstance(info.value, weights.WeightsNotFoundError)  # every handler of missing weights catches it


def test_a_folder_without_weights_names_the_folder(tmp_path: Path) -> None:
    good = write_tiny_checkpoint(tmp_path / "good")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(good / "open_clip_config.json", empty)
    with pytest.raises(weights.WeightsNotFoundError, match=f"no checkpoint file in {empty}"):
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(empty), device="cpu"))


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning", "ignore:.*TorchScript archive:UserWarning")
def test_a_torchscript_archive_says_how_to_get_a_loadable_file(tmp_path: Path) -> None:
    """OpenAI's release .pt files (what `weights fetch ... openai` used to keep) are TorchScript archives."""
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    jit = tmp_path / "ViT-L-14-336px.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(jit))
    assert weights.is_torchscript(jit)
    with pytest.raises(weights.WeightsLoadError, match="TorchScript") as info:
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(jit), device="cpu"))
    assert str(jit) in str(info.value) and "inspectd weights fetch" in str(info.value)
    assert "weights_only=false" not in str(info.value).lower()
    message = weights.load_failure_message("ViT-L-14-336", str(jit), jit, RuntimeError("x"))
    assert "inspectd weights fetch ViT-L-14-336 openai --out DIR" in message  # the release is known by its name
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    assert not weights.is_torchscript(plain)


@pytest.mark.parametrize(("arch", "pretrained", "quick"), [
    ("ViT-L-14-336", "/opt/weights/ViT-L-14-336px.pt", True),  # OpenAI's release file name (no "openai" in it)
    ("ViT-L-14-336", "/opt/weights/ViT-L-14-336-openai.safetensors", True),  # what `weights fetch` writes
    ("ViT-B-32", "/opt/weights/ViT-B-32-laion400m_e31.safetensors", True),  # open_clip's cfg: QuickGELU
    ("ViT-B-16-plus-240", "/opt/weights/vit_b_16_plus_240-laion400m_e31-8fb26589.pt", False),
    ("ViT-B-16-plus-240", "/opt/weights/ViT-B-16-plus-240-laion400m_e31.safetensors", False),
    ("ViT-B-16", "/opt/weights/my-openai-finetune.pt", True),  # unknown name: the "openai" rule
    ("ViT-B-16", "/opt/weights/open_clip_model.safetensors", False),
])
def test_quick_gelu_auto_follows_open_clips_pretrained_cfg_for_release_files(arch: str, pretrained: str,
                                                                               quick: bool) -> None:
    from inspectd.detectors.backbone import _wants_quick_gelu

    spec = ModelSpec(arch=arch, pretrained=pretrained)
    assert _wants_quick_gelu(spec, weights.WeightsSource("file", pretrained)) is quick
    assert _wants_quick_gelu(ModelSpec(arch="ViT-B-32", pretrained="laion400m_e31"),
                             weights.WeightsSource("tag", "laion400m_e31")) is True  # a tag: its cfg too


def test_release_file_names_map_to_their_tag() -> None:
    assert weights.pretrained_identity("ViT-L-14-336", "/a/ViT-L-14-336px.pt") == "openai"
    assert weights.pretrained_identity("ViT-L-14-336", "/b/ViT-L-14-336-openai.safetensors") == "openai"
    assert weights.pretrained_identity("ViT-B-16-plus-240", "/c/vit_b_16_plus_240-laion400m_e31-8fb26589.pt") == \
        "laion400m_e31"
    assert weights.pretrained_identity("ViT-L-14-336", "/d/open_clip_model.safetensors") == \
        "open_clip_model.safetensors"


# ------------------------------------------------------------------------------------------ weights fetch
def test_fetch_prefers_the_hub_copy_and_names_it_after_the_release() -> None:
    import open_clip

    from inspectd.commands.weights import fetch_target_name

    openai = open_clip.get_pretrained_cfg("ViT-L-14-336", "openai")
    assert openai["url"].endswith("ViT-L-14-336px.pt") and openai["hf_hub"]  # a TorchScript URL and a hub copy
    assert weights.prefer_hf_hub(openai, hub_installed=True) is True
    assert weights.prefer_hf_hub(openai, hub_installed=False) is False  # no huggingface_hub: the URL
    assert weights.prefer_hf_hub({"url": "https://x/y.pt"}, hub_installed=True) is False
    hub_file = Path("/cache/open_clip_model.safetensors")
    assert fetch_target_name("ViT-L-14-336", "openai", hub_file, True) == "ViT-L-14-336-openai.safetensors"
    release = Path("/cache/vit_b_16_plus_240-laion400m_e31-8fb26589.pt")
    assert fetch_target_name("ViT-B-16-plus-240", "laion400m_e31", release, False) == release.name


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning", "ignore:.*TorchScript archive:UserWarning")
def test_fetch_flow_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`inspectd weights fetch ViT-L-14-336 openai`: the hub's safetensors, a distinctive name, a sha256 note that
    `verify` checks on the copy; with only the release URL, a TorchScript download is refused as such."""
    import open_clip.pretrained
    from safetensors.torch import save_file

    from inspectd.cli import main

    calls = []

    def fake_download(cfg, prefer_hf_hub=True, cache_dir=None):  # noqa: ANN001, ANN202
        calls.append(prefer_hf_hub)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        if prefer_hf_hub:
            path = Path(cache_dir) / "open_clip_model.safetensors"
            save_file({"w": torch.ones(3)}, str(path))
        else:
            path = Path(cache_dir) / "ViT-L-14-336px.pt"
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
        return str(path)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake_download)
    out = tmp_path / "weights"
    assert main(["weights", "fetch", "ViT-L-14-336", "openai", "--out", str(out)]) == 0
    target = out / "ViT-L-14-336-openai.safetensors"
    assert calls == [True] and target.is_file() and weights.sha256_note(target).is_file()
    assert target.name in capsys.readouterr().out
    copy = tmp_path / "opt" / target.name
    copy.parent.mkdir()
    shutil.copy(target, copy)
    shutil.copy(weights.sha256_note(target), weights.sha256_note(copy))
    assert main(["weights", "verify", str(copy)]) == 0 and "OK" in capsys.readouterr().out
    copy.write_bytes(copy.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["weights", "verify", str(copy)]) == 1 and "MISMATCH" in capsys.readouterr().out
    monkeypatch.setattr(open_clip.pretrained, "has_hf_hub", lambda necessary=False: False)
    assert main(["weights", "fetch", "ViT-L-14-336", "openai", "--out", str(tmp_path / "url")]) == 1
    assert calls[-1] is False and "TorchScript" in capsys.readouterr().err
