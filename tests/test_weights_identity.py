"""What a cached state or a learned part is tied to: the weights' content (not their file name), the activation the
model runs (QuickGELU or GELU) and, for caches, the dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from inspectd.detectors.artifacts import ArtifactMismatch, check_backbone
from inspectd.detectors.backbone import ClipBackbone, ModelSpec
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.building import StateCache, ThresholdPolicy, build_fingerprint, build_product
from inspectd.detectors.tiny import register_tiny_arch, write_tiny_checkpoint
from inspectd.detectors.training.randword_ffn import (
    FfnBackboneMismatch,
    PromptConfig,
    TrainConfig,
    fit_randword_ffn,
    load_ffn,
    save_ffn,
)

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"
SPEC = ProductSpec("nut", "hazelnut")
TINY_TRAIN = TrainConfig(pairs=32, epochs=1, hidden=(8,), batch_size=16)


def backbone(pretrained: str | Path, **spec: object) -> ClipBackbone:
    register_tiny_arch()
    return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(pretrained), device="cpu", **spec))


def refs() -> tuple[list[Path], list[np.ndarray]]:
    files = sorted((HAZELNUT / "good").glob("*.png"))[:2]
    return files, [np.asarray(Image.open(p).convert("RGB").resize((128, 128))) for p in files]


def ffn_under(bb: ClipBackbone, path: Path) -> Path:
    return save_ffn(fit_randword_ffn(bb, PromptConfig(), TINY_TRAIN, progress=False), path)


# ------------------------------------------------------------------------------------------ activation and dtype
def test_quick_gelu_keys_the_state_cache_and_is_recorded(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gelu, quick = backbone(tiny_checkpoint, quick_gelu="false"), backbone(tiny_checkpoint, quick_gelu="true")
    det_g, det_q = create_detector("winclip", gelu), create_detector("winclip", quick)
    assert det_g.config_fingerprint() != det_q.config_fingerprint()
    files, images = refs()
    cache = StateCache(tmp_path / "cache")
    built = build_product(det_g, SPEC, images)
    built.fingerprint = build_fingerprint(det_g, SPEC, ThresholdPolicy(), files)
    cache.store(det_g, "nut", built)
    quick_print = build_fingerprint(det_q, SPEC, ThresholdPolicy(), files)
    assert quick_print != built.fingerprint
    assert cache.load(det_q, "nut", quick_print) is None  # a miss: the GELU bank is never served under QuickGELU
    # a product state file written under GELU is refused by a QuickGELU backbone, naming both
    det_g.save_state(built.state, tmp_path / "gelu-state.safetensors")
    with pytest.raises(ArtifactMismatch, match="quick_gelu") as err:
        det_q.load_state(tmp_path / "gelu-state.safetensors")
    assert "built with GELU, the backbone runs QuickGELU" in str(err.value)
    assert gelu.identity["quick_gelu"] is False and quick.identity["quick_gelu"] is True  # what the model runs
    assert gelu.weights_id == quick.weights_id  # the same weights, another activation


def test_a_learned_part_of_the_other_activation_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gelu, quick = backbone(tiny_checkpoint, quick_gelu="false"), backbone(tiny_checkpoint, quick_gelu="true")
    ffn = ffn_under(gelu, tmp_path / "ffn.safetensors")
    with pytest.raises(FfnBackboneMismatch, match="quick_gelu"):
        load_ffn(ffn, quick)
    assert load_ffn(ffn, gelu).identity["quick_gelu"] is False


def test_precision_keys_the_state_cache_but_not_learned_parts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fp32 = backbone(tiny_checkpoint, precision="fp32", cpu_kernels="torch")
    bf16 = backbone(tiny_checkpoint, precision="bf16", cpu_kernels="torch")
    prints = {create_detector("winclip", b).config_fingerprint() for b in (fp32, bf16)}
    assert len(prints) == 2
    assert (fp32.identity["dtype"], bf16.identity["dtype"]) == ("float32", "bfloat16")
    assert fp32.weights_id == bf16.weights_id  # taken before the cast rounds the weights
    check_backbone(fp32.identity, bf16.identity, where="x")  # an FFN trained in fp32 still serves a bf16 daemon


# ------------------------------------------------------------------------------------------ the weights' content
def _same_name_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two different checkpoints, both named open_clip_model.safetensors (the hub layout's generic name)."""
    files = []
    for seed, site in ((0, "site_a"), (1, "site_b")):
        made = write_tiny_checkpoint(tmp_path / f"gen{seed}", seed=seed)
        (tmp_path / site).mkdir()
        files.append(shutil.move(made / "open_clip_model.safetensors", tmp_path / site / "open_clip_model.safetensors"))
    return Path(files[0]), Path(files[1])


def test_a_learned_part_is_refused_under_other_weights_of_the_same_file_name(tmp_path: Path) -> None:
    file_a, file_b = _same_name_pair(tmp_path)
    a, b = backbone(file_a), backbone(file_b)
    assert a.identity["weights"] == b.identity["weights"] == "open_clip_model.safetensors"
    assert a.weights_id != b.weights_id
    ffn = ffn_under(a, tmp_path / "ffn.safetensors")
    with pytest.raises(FfnBackboneMismatch, match="weights_id") as err:
        load_ffn(ffn, b)
    assert a.weights_id in str(err.value) and b.weights_id in str(err.value)  # names both
    with pytest.raises(ArtifactMismatch):  # the detector path (what the daemon runs) refuses it too
        create_detector("randword", b, {"ffn": str(ffn)}).fit(SPEC, [])
    load_ffn(ffn, a)
    with safe_open(str(ffn), framework="pt") as handle:
        header = json.loads(handle.metadata()["backbone"])
    assert header["weights_id"] == a.weights_id and header["demo_weights"] is True  # recorded in every header


def test_the_same_weights_as_a_tag_a_file_or_a_folder_are_one_identity(tiny_checkpoint: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip.pretrained
    from safetensors.torch import load_file

    state = load_file(str(tiny_checkpoint / "open_clip_model.safetensors"))
    pt = tmp_path / "release" / "tiny-release.pt"
    pt.parent.mkdir()
    torch.save(state, pt)  # the same tensors in another container, under another name
    # a pretrained tag of the tiny arch whose download is that .pt file (open_clip's 'file' entries)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "inspectd-tiny", {"tinytag": {"file": str(pt)}})
    folder, file, tag = backbone(tiny_checkpoint), backbone(tiny_checkpoint / "open_clip_model.safetensors"), \
        backbone("tinytag")
    assert len({folder.identity["weights"], file.identity["weights"], tag.identity["weights"]}) == 3
    assert folder.weights_id == file.weights_id == tag.weights_id
    ffn = ffn_under(folder, tmp_path / "ffn.safetensors")
    for other in (file, tag):  # accepted: same content, whatever the name
        load_ffn(ffn, other)
        create_detector("randword", other, {"ffn": str(ffn)}).fit(SPEC, [])


def test_artifacts_from_before_weights_id_are_compared_by_name() -> None:
    old = {"arch": "inspectd-tiny", "weights": "clip_a", "embed_dim": 64, "width": 64}
    now = {**old, "weights_id": "tensors-sha256:aa", "quick_gelu": False, "dtype": "float32"}
    check_backbone(old, now, where="old.safetensors")
    with pytest.raises(ArtifactMismatch, match="differs in weights"):
        check_backbone(old, {**now, "weights": "clip_b"}, where="old.safetensors")
    with pytest.raises(ArtifactMismatch, match="differs in weights_id"):
        check_backbone({**now, "weights_id": "tensors-sha256:bb"}, now, where="new.safetensors")
