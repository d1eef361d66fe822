"""The weights-loading path as a user meets it: the folder `inspectd weights fetch --out DIR` writes, and
`inspectd weights verify` on checkpoints of one's own naming."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from inspectd.detectors import weights
from inspectd.detectors.backbone import ClipBackbone, ModelSpec, _wants_quick_gelu, uses_quick_gelu
from inspectd.detectors.tiny import register_tiny_arch, write_tiny_checkpoint


@pytest.mark.parametrize(("arch", "file_name", "quick"), [
    ("ViT-B-32", "ViT-B-32-laion400m_e31.safetensors", True),  # open_clip's cfg of that release: QuickGELU
    ("ViT-L-14-336", "ViT-L-14-336-openai.safetensors", True),
    ("ViT-B-16-plus-240", "ViT-B-16-plus-240-laion400m_e31.safetensors", False),
])
def test_quick_gelu_of_a_fetch_folder_follows_the_file_in_it(tmp_path: Path, arch: str, file_name: str,
                                                             quick: bool) -> None:
    """`weights fetch ARCH TAG --out /opt/clip` writes /opt/clip/ARCH-TAG.safetensors; model.pretrained: /opt/clip
    loads that file, so its release decides the activation, as for the file itself (not the folder's name)."""
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / file_name).write_bytes(b"")  # only the names are read
    spec = ModelSpec(arch=arch, pretrained=str(folder))
    assert _wants_quick_gelu(spec, weights.WeightsSource("dir", str(folder))) is quick
    assert _wants_quick_gelu(spec, weights.WeightsSource("file", str(folder / file_name))) is quick


def test_openai_weights_in_a_folder_load_into_quick_gelu(tmp_path: Path) -> None:
    register_tiny_arch()
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(write_tiny_checkpoint(tmp_path / "tiny") / "open_clip_model.safetensors",
                folder / "clip-openai-finetune.safetensors")
    by_folder = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(folder), device="cpu"))
    by_file = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(folder / "clip-openai-finetune.safetensors"),
                                     device="cpu"))
    assert uses_quick_gelu(by_file.model) and uses_quick_gelu(by_folder.model)
    assert by_folder.identity["quick_gelu"] is True and by_folder.weights_id == by_file.weights_id


def test_verify_calls_no_file_of_ones_own_naming_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A name ending in 8 hex digits is not always a sha256 prefix (a date stamp): such a file is unverified (3),
    not corrupt (1); a release file's name still is a claim (1 on a mismatch), and a matching suffix still passes."""
    from inspectd.cli import main

    payload = b"fine-tuned weights"
    dated = tmp_path / "clip-ft-20240315.pt"
    dated.write_bytes(payload)
    ok, message = weights.verify(dated)
    assert ok is None and "MISMATCH" not in message and "20240315" in message
    assert main(["weights", "verify", str(dated)]) == 3
    assert "MISMATCH" not in capsys.readouterr().out
    release = tmp_path / "vit_b_32-quickgelu-laion400m_e31-d867053b.pt"  # open_clip's release URL name
    release.write_bytes(payload)
    assert main(["weights", "verify", str(release)]) == 1 and "MISMATCH" in capsys.readouterr().out
    own = tmp_path / f"clip-ft-{hashlib.sha256(payload).hexdigest()[:8]}.pt"
    own.write_bytes(payload)
    assert main(["weights", "verify", str(own)]) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_non_finite_values_fail_at_load_naming_the_file(tmp_path: Path, bad: float) -> None:
    """A diverged fine-tune or a damaged copy loads without complaint in open_clip; every score would be NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    register_tiny_arch()
    folder = write_tiny_checkpoint(tmp_path / "tiny")
    file = folder / "open_clip_model.safetensors"
    state = load_file(str(file))
    good = state["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5].item()
    state["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = bad
    save_file(state, str(file))
    for pretrained in (folder, file):
        with pytest.raises(weights.WeightsLoadError) as info:
            ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(pretrained), device="cpu"))
        message = str(info.value)
        assert f"inspectd weights verify {file}" in message and "visual.transformer.resblocks.1.mlp.c_fc" in message
    state["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = good
    save_file(state, str(file))
    assert torch.isfinite(ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(file), device="cpu")).visual.proj
                          ).all()


def test_an_offline_hub_is_named_as_the_reason_whatever_the_spelling(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=on is offline for the hub (it reads 1/ON/YES/TRUE when imported: its constant stands for
    that here): the error must not tell the user to set the variable they did set."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "on")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(weights.WeightsNotFoundError) as info:
        ClipBackbone(ModelSpec(arch="ViT-B-16-plus-240", pretrained="laion400m_e31", device="cpu",
                               cache_dir=str(tmp_path)))
    assert "HF_HUB_OFFLINE is set" in str(info.value) and "set HF_HUB_OFFLINE=1" not in str(info.value)


def test_a_readable_file_that_is_no_checkpoint_is_not_called_damaged(tmp_path: Path) -> None:
    """`verify` would pass such a file (its bytes are what was written): the error must say what it really is."""
    import torch
    from safetensors.torch import load_file

    register_tiny_arch()
    good = write_tiny_checkpoint(tmp_path / "tiny") / "open_clip_model.safetensors"
    cases = {}
    torch.save({}, tmp_path / "empty-dict.pt")
    torch.save({"state_dict": {}}, tmp_path / "empty-state.pt")
    torch.save([load_file(str(good))], tmp_path / "a-list.pt")
    for name in ("empty-dict.pt", "empty-state.pt", "a-list.pt"):
        cases[name] = "holds no state dict"
    shutil.copy(good, tmp_path / "clip.pt")  # safetensors bytes under a PyTorch name
    cases["clip.pt"] = "rename it to clip.safetensors"
    for name, says in cases.items():
        with pytest.raises(weights.WeightsLoadError) as info:
            ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tmp_path / name), device="cpu"))
        message = str(info.value)
        assert says in message and "damaged" not in message, message
        assert f"inspectd weights verify {tmp_path / name}" in message
    shutil.move(tmp_path / "clip.pt", tmp_path / "clip.safetensors")  # what the message says to do works
    ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tmp_path / "clip.safetensors"), device="cpu"))
    truncated = tmp_path / "truncated.pt"
    torch.save(load_file(str(good)), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    with pytest.raises(weights.WeightsLoadError, match="damaged or truncated"):
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(truncated), device="cpu"))


def test_a_folder_holding_only_a_pt_file_says_to_name_the_file(tmp_path: Path) -> None:
    """`weights fetch` without huggingface_hub writes the release's .pt into DIR; open_clip never looks for *.pt in
    a folder, so pretrained: DIR must say so rather than call the folder empty."""
    import torch
    from safetensors.torch import load_file

    register_tiny_arch()
    folder = tmp_path / "weights"
    folder.mkdir()
    release = folder / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"
    torch.save(load_file(str(write_tiny_checkpoint(tmp_path / "tiny") / "open_clip_model.safetensors")), release)
    with pytest.raises(weights.WeightsNotFoundError) as info:
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(folder), device="cpu"))
    assert release.name in str(info.value) and "model.pretrained to the file itself" in str(info.value)
    ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(release), device="cpu"))  # as it says: it loads
