"""Random-word FFN: prompt generator, pair batching, FFN, file format, separation on the tiny CLIP, detector."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.training.randword_ffn import (
    FfnBackboneMismatch,
    FfnBundle,
    PromptConfig,
    RandWordFFN,
    TrainConfig,
    encode_prompts,
    fit_randword_ffn,
    generate_pairs,
    load_ffn,
    pair_batches,
    random_word,
    save_ffn,
    train_ffn,
)

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"
WORD = r"[A-Za-z0-9]{5,10}"
AUROC_FLOOR = 0.75  # measured 0.804 / 0.807 / 0.810 (seeds 0/1/2, N=2000, 500 held-out pairs, tiny CLIP)


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def bundle(tiny_backbone: ClipBackbone) -> FfnBundle:
    return fit_randword_ffn(tiny_backbone, PromptConfig(), TrainConfig(pairs=2000, seed=0), progress=False)


@pytest.fixture(scope="module")
def ffn_file(bundle: FfnBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_ffn(bundle, tmp_path_factory.mktemp("ffn") / "ffn.safetensors")


# ----------------------------------------------------------------------------- prompts
def test_templates_fill_every_slot_with_a_random_word() -> None:
    pairs = generate_pairs(200, PromptConfig(), seed=0)
    normal = re.compile(rf"^{WORD} a {WORD} photo {WORD} of {WORD} a object {WORD}$")
    anomalous = re.compile(rf"^{WORD} a {WORD} photo {WORD} of {WORD} a damaged object {WORD}$")
    for n, a in pairs:
        assert normal.match(n), n
        assert anomalous.match(a), a
    words = [w for n, _ in pairs for w in n.split() if w not in {"a", "photo", "of", "object"}]
    assert len(words) == 200 * 5


def test_random_words_lengths_and_alphabet_are_uniform() -> None:
    import random

    rng = random.Random(0)
    config = PromptConfig()
    words = [random_word(rng, config) for _ in range(6000)]
    lengths = Counter(len(w) for w in words)
    assert set(lengths) == set(range(5, 11))
    assert all(abs(c / len(words) - 1 / 6) < 0.03 for c in lengths.values())
    chars = Counter("".join(words))
    assert set(chars) <= set(string.ascii_letters + string.digits)
    assert set(chars) == set(string.ascii_letters + string.digits)  # every symbol occurs
    expected = sum(chars.values()) / 62
    assert max(chars.values()) < 1.3 * expected and min(chars.values()) > 0.7 * expected


def test_generation_is_seeded_and_words_configurable() -> None:
    assert generate_pairs(20, PromptConfig(), 3) == generate_pairs(20, PromptConfig(), 3)
    assert generate_pairs(20, PromptConfig(), 3) != generate_pairs(20, PromptConfig(), 4)
    config = PromptConfig(normal_word="a normal", anomaly_word="a broken", object_word="hazelnut", min_len=2,
                          max_len=2, alphabet="xy")
    n, a = generate_pairs(1, config, 0)[0]
    assert re.match(r"^[xy]{2} a [xy]{2} photo [xy]{2} of [xy]{2} a normal hazelnut [xy]{2}$", n)
    assert re.match(r"^[xy]{2} a [xy]{2} photo [xy]{2} of [xy]{2} a broken hazelnut [xy]{2}$", a)
    assert "  " not in generate_pairs(1, PromptConfig(object_word=""), 0)[0][0]
    with pytest.raises(ValueError):
        PromptConfig(min_len=6, max_len=5)


def test_pairs_stay_together_in_batches() -> None:
    n_pairs = 1000
    batches = pair_batches(n_pairs, 128, torch.Generator().manual_seed(0))
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(2 * n_pairs))
    assert all(len(b) == 128 for b in batches[:-1]) and len(batches[-1]) == 2 * n_pairs - 128 * (len(batches) - 1)
    for batch in batches:
        members = set(batch.tolist())
        assert all((r ^ 1) in members for r in members)  # 2i and 2i+1 together
    other = torch.cat(pair_batches(n_pairs, 128, torch.Generator().manual_seed(1)))
    assert not torch.equal(rows, other)  # shuffled
    with pytest.raises(ValueError):
        TrainConfig(batch_size=127)


# ----------------------------------------------------------------------------- the FFN
def test_ffn_shapes_and_layers() -> None:
    model = RandWordFFN(640)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(640, 512), (512, 256), (256, 128), (128, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 3
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.5] * 3
    assert model(torch.randn(7, 640)).shape == (7,)
    assert RandWordFFN(64, (32, 16), 0.1)(torch.randn(3, 64)).shape == (3,)


def test_inference_uses_batchnorm_statistics_not_the_batch(bundle: FfnBundle) -> None:
    assert not bundle.model.training
    x = torch.randn(16, bundle.embed_dim)
    together = bundle.score(x)
    alone = torch.cat([bundle.score(x[i:i + 1]) for i in range(16)])
    torch.testing.assert_close(together, alone)
    assert bundle.model.net[1].running_var.mean() != 1.0  # statistics were learned
    torch.testing.assert_close(bundle.score(3 * x), together)  # L2-normalised first


def test_training_is_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    normal, anomalous = torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g) + 0.5
    config = TrainConfig(pairs=300, hidden=(16, 8, 4), seed=5)
    m1, h1 = train_ffn(normal, anomalous, config, progress=False)
    m2, h2 = train_ffn(normal, anomalous, config, progress=False)
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    assert [h["lr"] for h in h1] == [1e-3, pytest.approx(1e-4)]  # decayed after epoch 1


def test_ffn_separates_held_out_tiny_clip_text_embeddings(tiny_backbone: ClipBackbone, bundle: FfnBundle) -> None:
    held_out = generate_pairs(500, PromptConfig(), seed=12345)
    normal = encode_prompts(tiny_backbone, [p[0] for p in held_out], progress=False)
    anomalous = encode_prompts(tiny_backbone, [p[1] for p in held_out], progress=False)
    scores = bundle.score(torch.cat([normal, anomalous])).numpy()
    auroc = roc_auc_score([0] * 500 + [1] * 500, scores)
    assert auroc >= AUROC_FLOOR, auroc
    assert bundle.history[-1]["loss"] < bundle.history[0]["loss"]


# ----------------------------------------------------------------------------- file format
def test_save_load_round_trip_and_metadata(bundle: FfnBundle, ffn_file: Path, tiny_backbone: ClipBackbone) -> None:
    loaded = load_ffn(ffn_file, tiny_backbone)
    x = torch.randn(5, bundle.embed_dim)
    torch.testing.assert_close(loaded.score(x), bundle.score(x))
    assert loaded.model_id == tiny_backbone.model_id and loaded.embed_dim == 64
    assert loaded.prompts == bundle.prompts and loaded.train == bundle.train
    from safetensors import safe_open

    with safe_open(str(ffn_file), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "inspectd-artifact" and meta["kind"] == "learned" and meta["detector"] == "randword"
    assert json.loads(meta["backbone"]) == tiny_backbone.identity
    training = json.loads(meta["training"])
    assert training["data"]["words"]["anomaly"] == "a damaged" and len(training["history"]) == bundle.train.epochs
    assert json.loads(meta["config"])["ffn"]["embed_dim"] == 64


def test_an_ffn_file_of_the_old_format_says_how_to_refit(tmp_path: Path, bundle: FfnBundle) -> None:
    from safetensors.torch import save_file

    old = tmp_path / "old-ffn.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(old),
              metadata={"format": "inspectd-randword-ffn", "format_version": "1"})
    with pytest.raises(ValueError, match="inspectd fit randword") as err:
        load_ffn(old)
    assert "inspectd-randword-ffn" in str(err.value)


def test_an_ffn_of_another_detector_version_names_both(tmp_path: Path, bundle: FfnBundle) -> None:
    from inspectd.detectors.artifacts import ArtifactMismatch, save_artifact
    from inspectd.detectors.training.randword_ffn import ffn_artifact

    artifact = ffn_artifact(bundle, bundle.identity)
    artifact.detector_version = 99
    save_artifact(artifact, tmp_path / "future.safetensors")
    with pytest.raises(ArtifactMismatch, match=r"version 99.*version 1"):
        load_ffn(tmp_path / "future.safetensors")


def _backbone_like(arch: str, pretrained: str, embed_dim: int) -> SimpleNamespace:
    from inspectd.detectors.weights import pretrained_identity

    return SimpleNamespace(spec=SimpleNamespace(arch=arch, pretrained=pretrained), model_id=f"{arch}/{pretrained}",
                           embed_dim=embed_dim, identity={"arch": arch, "embed_dim": embed_dim,
                                                          "weights": pretrained_identity(arch, pretrained)})


def test_loading_under_another_backbone_names_both(ffn_file: Path, tiny_backbone: ClipBackbone) -> None:
    other = _backbone_like("ViT-B-16-plus-240", "laion400m_e31", 640)
    with pytest.raises(FfnBackboneMismatch) as err:
        load_ffn(ffn_file, other)
    ours = f"inspectd-tiny/{Path(tiny_backbone.spec.pretrained).name}"
    assert "ViT-B-16-plus-240/laion400m_e31" in str(err.value) and ours in str(err.value)
    assert "inspectd fit randword --arch ViT-B-16-plus-240" in str(err.value)
    with pytest.raises(FfnBackboneMismatch):
        load_ffn(ffn_file, _backbone_like("inspectd-tiny", "/elsewhere/other-ckpt", 64))
    # the same checkpoint folder at another path is the same model
    load_ffn(ffn_file, _backbone_like("inspectd-tiny", f"/moved/{Path(tiny_backbone.spec.pretrained).name}", 64))


# ----------------------------------------------------------------------------- detector
def _expected_zero_shot(backbone: ClipBackbone, bundle: FfnBundle, image: np.ndarray, prompts: list[str]) -> tuple:
    tiles, _ = backbone.preprocessor(image)
    e = backbone.forward(tiles, create_detector("randword", backbone, {"use_ffn": False}).feature_request(None))
    e = torch.nn.functional.normalize(e.image_embeddings.double(), dim=-1)
    t = backbone.encode_text(prompts).double()
    s_p = torch.exp(e @ t[1] / 0.01) / (torch.exp(e @ t[0] / 0.01) + torch.exp(e @ t[1] / 0.01))
    s_ffn = bundle.score(e.float()).double()
    return e, s_p, s_ffn


def test_detector_zero_shot_end_to_end(tiny_backbone: ClipBackbone, bundle: FfnBundle, ffn_file: Path) -> None:
    image = load_rgb(HAZELNUT / "good" / "00.png")
    detector = create_detector("randword", tiny_backbone, {"ffn": str(ffn_file), "multi_crop": 0})
    assert detector.produces_masks is False
    state = detector.fit(ProductSpec("hazelnut", object_name="hazelnut"), [])
    assert state.meta["prompts"] == ["a photo of a object", "a photo of a damaged object"]
    [out] = run([ScoreItem(detector, state, image=image)])
    assert out.map is None
    _, s_p, s_ffn = _expected_zero_shot(tiny_backbone, bundle, image, state.meta["prompts"])
    assert out.score == pytest.approx(float((s_p + s_ffn).mean()), abs=1e-5)

    ours = create_detector("randword", tiny_backbone,
                           {"ffn": str(ffn_file), "use_prompt_score": False, "multi_crop": 0})
    [only_ffn] = run([ScoreItem(ours, ours.fit(ProductSpec("h"), []), image=image)])
    assert only_ffn.score == pytest.approx(float(s_ffn.mean()), abs=1e-5)

    known = create_detector("randword", tiny_backbone, {"ffn": str(ffn_file), "known_object": True, "multi_crop": 0})
    assert known.fit(ProductSpec("h", object_name="hazelnut"), []).meta["prompts"][1] == "a photo of a damaged hazelnut"

    # the state records its FFN: it survives save/load and scores the same under a fresh detector
    path = ffn_file.parent / "state.safetensors"
    detector.save_state(state, path)
    fresh = create_detector("randword", tiny_backbone, {"ffn": str(ffn_file), "multi_crop": 0})
    loaded, _ = fresh.load_state(path)
    assert loaded.meta["ffn"]["sha256"] == fresh.ffn().content_hash
    [again] = run([ScoreItem(fresh, loaded, image=image)])
    assert again.score == pytest.approx(out.score, abs=1e-6)
    assert not any(k.startswith("ffn.") for k in loaded.tensors)  # the FFN lives in its artifact, not the state


def test_detector_few_shot_adds_reference_distance(tiny_backbone: ClipBackbone, bundle: FfnBundle,
                                                   ffn_file: Path) -> None:
    refs = [load_rgb(HAZELNUT / "good" / f"{i:02d}.png") for i in (1, 2)]
    test = load_rgb(HAZELNUT / "good" / "00.png")
    detector = create_detector("randword", tiny_backbone, {"ffn": str(ffn_file), "multi_crop": 0})
    state = detector.fit(ProductSpec("hazelnut"), refs)
    n_tiles = sum(tiny_backbone.preprocessor(r)[0].shape[0] for r in refs)  # every tile of every reference
    assert state.tensors["memory_image"].shape == (n_tiles, 64) and state.meta["shots"] == 2
    [out, self_ref] = run([ScoreItem(detector, state, image=test),
                                          ScoreItem(detector, state, image=refs[0])])
    e, s_p, s_ffn = _expected_zero_shot(tiny_backbone, bundle, test, state.meta["prompts"])
    memory = torch.nn.functional.normalize(
        tiny_backbone.forward(torch.cat([tiny_backbone.preprocessor(r)[0] for r in refs]),
                              detector.feature_request(state)).image_embeddings.double(), dim=-1)
    s_img = (0.5 * (1 - e @ memory.T)).min(dim=1).values
    assert float(s_img.mean()) > 1e-6  # random towers embed all images nearly alike: small but > 0
    assert out.score == pytest.approx(float((s_p + s_ffn + s_img).mean()), abs=1e-5)
    [zero] = run([ScoreItem(detector, detector.fit(ProductSpec("hazelnut"), []), image=test)])
    assert out.score - zero.score == pytest.approx(float(s_img.mean()), abs=2e-6)  # fp32 1 - cos
    _, s_p_ref, s_ffn_ref = _expected_zero_shot(tiny_backbone, bundle, refs[0], state.meta["prompts"])
    assert self_ref.score == pytest.approx(float((s_p_ref + s_ffn_ref).mean()), abs=1e-5)  # s_img = 0


def test_detector_errors_are_clear(tiny_backbone: ClipBackbone, ffn_file: Path) -> None:
    detector = create_detector("randword", tiny_backbone, {})
    with pytest.raises(ValueError, match="inspectd fit randword"):
        detector.fit(ProductSpec("p"), [])
    prompt_only = create_detector("randword", tiny_backbone, {"use_ffn": False})
    state = prompt_only.fit(ProductSpec("p"), [])
    with pytest.raises(ValueError, match="no FFN"):
        run([ScoreItem(detector, state, image=load_rgb(HAZELNUT / "good" / "00.png"))])
    with pytest.raises(ValueError, match="both false"):
        create_detector("randword", tiny_backbone, {"use_ffn": False, "use_prompt_score": False})
    changed = create_detector("randword", tiny_backbone, {"ffn": str(ffn_file)}).config_fingerprint()
    assert changed != create_detector("randword", tiny_backbone, {"ffn": str(ffn_file) + ".x"}).config_fingerprint()


# ----------------------------------------------------------------------------- CLI
def test_cli_fit_writes_a_loadable_file(tiny_checkpoint: Path, tiny_backbone: ClipBackbone, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from inspectd.cli import main

    out = tmp_path / "cli.safetensors"
    code = main(["fit", "randword", "--arch", "inspectd-tiny", "--pretrained", str(tiny_checkpoint),
                 "--device", "cpu", "--pairs", "64", "--seed", "3", "--object-word", "hazelnut",
                 "--hidden", "32,16,8", "--out", str(out), "--no-progress"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    loaded = load_ffn(out, tiny_backbone)
    assert loaded.train.pairs == 64 and loaded.train.seed == 3 and loaded.model.hidden == (32, 16, 8)
    assert loaded.prompts.object_word == "hazelnut"


def test_cli_resumes_only_a_checkpoint_of_the_same_run(tiny_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted `inspectd fit randword` leaves OUT.ckpt/; a re-run with another CLIP checkpoint, other prompt
    words or another dropout must not continue from it (the FFN would hold weights trained on other embeddings)."""
    import inspectd.detectors.training.loop as loop
    from inspectd.cli import main
    from inspectd.detectors.artifacts import load_artifact
    from inspectd.detectors.tiny import write_tiny_checkpoint

    other_clip = write_tiny_checkpoint(tmp_path / "clip_b", seed=1)
    out = tmp_path / "ffn.safetensors"

    def fit(clip: Path, target: Path = out, *extra: str) -> int:
        return main(["fit", "randword", "--out", str(target), "--arch", "inspectd-tiny", "--pretrained", str(clip),
                     "--device", "cpu", "--pairs", "64", "--epochs", "2", "--hidden", "16", "--batch-size", "32",
                     "--no-progress", *extra])

    real = loop._run_epoch

    def interrupted_in_epoch_2(run, epoch, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if epoch == 2:
            raise KeyboardInterrupt
        return real(run, epoch, *args, **kwargs)

    monkeypatch.setattr(loop, "_run_epoch", interrupted_in_epoch_2)
    assert fit(tiny_checkpoint) == 130
    assert (tmp_path / "ffn.safetensors.ckpt" / "loop.safetensors").is_file()
    monkeypatch.setattr(loop, "_run_epoch", real)
    capsys.readouterr()
    for clip, extra, differs in ((other_clip, (), "weights_id"), (tiny_checkpoint, ("--object-word", "screw"),
                                 "object_word"), (tiny_checkpoint, ("--dropout", "0.25"), "dropout")):
        assert fit(clip, out, *extra) == 2 and not out.exists()
        err = capsys.readouterr().err
        assert "different training run" in err and differs in err and "--fresh" in err, err
    assert fit(tiny_checkpoint) == 0  # the same run resumes
    resumed = load_artifact(out)
    assert resumed.training["resumed_from_epoch"] == 1 and len(resumed.training["history"]) == 2
    assert fit(tiny_checkpoint, tmp_path / "straight.safetensors") == 0
    straight = load_artifact(tmp_path / "straight.safetensors")
    assert straight.training["resumed_from_epoch"] == 0
    for key, tensor in straight.tensors.items():  # resuming gives exactly the uninterrupted run
        assert torch.equal(tensor, resumed.tensors[key]), key


def test_cli_random_weights_need_demo_and_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inspectd.cli import main
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    out = tmp_path / "demo.safetensors"
    args = ["fit", "randword", "--arch", "inspectd-tiny", "--pretrained", "random", "--device", "cpu",
            "--pairs", "32", "--out", str(out), "--no-progress"]
    assert main(args) == 2 and not out.exists()
    assert "--demo" in capsys.readouterr().err
    assert main([*args, "--demo"]) == 0 and out.exists()
    assert "RANDOM weights" in capsys.readouterr().err


def test_multi_crop_averages_the_full_view_and_its_crops(tiny_backbone: ClipBackbone, bundle: FfnBundle,
                                                         ffn_file: Path) -> None:
    from inspectd.detectors.preprocess import crop_views

    image = load_rgb(HAZELNUT / "colour" / "02.png")
    detector = create_detector("randword", tiny_backbone, {"ffn": str(ffn_file), "multi_crop": 5})
    state = detector.fit(ProductSpec("hazelnut"), [])
    [out] = run([ScoreItem(detector, state, image=image)])
    tiles, _ = tiny_backbone.preprocessor(image)
    views = torch.cat([tiles, crop_views(tiles, 5)])
    assert views.shape[0] == 6
    e = torch.nn.functional.normalize(tiny_backbone.forward(views, detector.feature_request(state))
                                      .image_embeddings.double(), dim=-1)
    t = tiny_backbone.encode_text(state.meta["prompts"]).double()
    s_p = torch.softmax(torch.stack([e @ t[0], e @ t[1]], dim=-1) / 0.01, dim=-1)[:, 1]
    expected = (s_p + bundle.score(e.float()).double()).mean()
    assert out.score == pytest.approx(float(expected), abs=1e-5)
    [single] = run([ScoreItem(create_detector("randword", tiny_backbone,
                                                             {"ffn": str(ffn_file), "multi_crop": 0}),
                                             state, image=image)])
    assert single.score != pytest.approx(out.score, abs=1e-7)


async def test_a_product_serves_the_ffn_it_was_built_with_when_the_file_is_retrained_in_place(
        tiny_backbone: ClipBackbone, bundle: FfnBundle, tmp_path: Path) -> None:
    """The FFN is loaded by the build, not by the first frame: a product restored from the state cache and then
    retrained in place (``inspectd fit randword --out`` over the same file) keeps scoring with the FFN its state
    records until it is reloaded; the reload then fits with the new file. (It used to load the file at the first
    frame, find another hash than its state's and dead-letter every frame.)"""
    from inspectd.daemon.config import ProductConfig, RegistryConfig, build
    from inspectd.daemon.registry import ProductRegistry

    ffn = save_ffn(bundle, tmp_path / "ffn.safetensors")
    retrained = fit_randword_ffn(tiny_backbone, PromptConfig(), TrainConfig(pairs=2000, seed=1), progress=False)
    (tmp_path / "refs").mkdir()
    config = build(ProductConfig, {"id": "rw", "object_name": "hazelnut", "references": str(tmp_path / "refs"),
                                   "shots": 0, "detector": "randword", "options": {"ffn": str(ffn), "multi_crop": 0}},
                   "")
    cache = RegistryConfig(state_cache_dir=str(tmp_path / "cache"), watch=False)
    image = load_rgb(HAZELNUT / "colour" / "01.png")
    first = ProductRegistry(tiny_backbone, cache)
    try:
        built = await first.put(config)
        [expected] = run([ScoreItem(built.detector, built.state, image=image)])
    finally:
        first.close()
    restarted = ProductRegistry(tiny_backbone, cache)  # a daemon restart: the state comes from the cache
    try:
        entry = await restarted.put(config)
        assert entry.fingerprint == built.fingerprint
        save_ffn(retrained, ffn)  # retrained in place while the product serves
        [out] = run([ScoreItem(entry.detector, entry.state, image=image)])
        assert out.score == pytest.approx(expected.score, abs=1e-6)
        reloaded = await restarted.put(config)
        assert reloaded.fingerprint != entry.fingerprint
        assert reloaded.state.meta["ffn"]["sha256"] == load_ffn(ffn).content_hash != entry.state.meta["ffn"]["sha256"]
        [new] = run([ScoreItem(reloaded.detector, reloaded.state, image=image)])
        assert new.score != pytest.approx(expected.score, abs=1e-6)
    finally:
        restarted.close()
