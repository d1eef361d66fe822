"""APRIL-GAN: stage-map and memory maths against naive loops, mosaics, positional embeddings, the adapter
trainer on real masks (loss falls, seeded), artifacts, and a daemon scoring it beside WinCLIP from Redis."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.detectors.aprilgan import AprilGan
from inspectd.detectors.aprilgan.adapters import (
    StageAdapters,
    adapters_artifact,
    default_image_size,
    default_stages,
    load_adapters,
)
from inspectd.detectors.aprilgan.training import AprilGanFitConfig, AprilGanTrainer, Sample, _Data, mosaic, plan_batches
from inspectd.detectors.artifacts import ArtifactMismatch, save_artifact
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.context import FitContext
from inspectd.detectors.data.datasets import open_dataset
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.training.trainer import TrainingData

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAZELNUT = DATA / "hazelnut_toy" / "hazelnut"


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def adapters_file(tiny_backbone: ClipBackbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random adapters for the tiny model (training is tested separately)."""
    torch.manual_seed(3)
    module = StageAdapters(tiny_backbone.width, tiny_backbone.embed_dim, 2)
    path = tmp_path_factory.mktemp("aprilgan") / "adapters.safetensors"
    save_artifact(adapters_artifact(module, (0, 1), 240, tiny_backbone.identity, {}, {"history": []}), path)
    return path


# ----------------------------------------------------------------------------- configuration
def test_stage_layers_follow_depth_and_the_paper_default() -> None:
    assert default_stages(24) == (5, 11, 17, 23)  # the report's layers 6/12/18/24
    assert default_stages(12) == (2, 5, 8, 11)  # ViT-B-16-plus-240: 3/6/9/12
    assert default_stages(2) == (0, 1)
    assert default_image_size("ViT-L-14-336", 336) == 518 and default_image_size("ViT-B-16-plus-240", 240) == 240


def test_the_detector_needs_adapters_and_says_how_to_get_them(tiny_backbone: ClipBackbone, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inspectd fit aprilgan"):
        create_detector("aprilgan", tiny_backbone)
    det = create_detector("aprilgan", tiny_backbone, {"adapters": str(tmp_path / "missing.safetensors")})
    with pytest.raises(FileNotFoundError, match="inspectd fit aprilgan"):
        det.fit(ProductSpec("nut", "hazelnut"), [])


# ----------------------------------------------------------------------------- maths
def test_zero_and_few_shot_maps_match_a_naive_per_patch_loop(tiny_backbone: ClipBackbone, adapters_file: Path
                                                             ) -> None:
    det = create_detector("aprilgan", tiny_backbone, {"adapters": str(adapters_file)})
    refs = [rgb(HAZELNUT / "good" / "00.png"), rgb(HAZELNUT / "good" / "01.png")]
    test = rgb(HAZELNUT / "colour" / "04.png")
    zero, few = det.fit(ProductSpec("nut", "hazelnut"), []), det.fit(ProductSpec("nut", "hazelnut"), refs)
    tiles, _ = det.preprocessor(test)
    feats = tiny_backbone.forward(tiles, det.feature_request(few))
    ref_feats = tiny_backbone.forward(torch.cat([det.preprocessor(r)[0] for r in refs]), det.feature_request(few))
    text = zero.tensors["text_prototypes"].double()
    e = feats.image_embeddings[0].double()
    e = e / e.norm()
    logits = 100 * text @ e
    text_score = float(torch.exp(logits[1]) / torch.exp(logits).sum())
    gh, gw = feats.grid
    stage_grids, memory_grids = [], []
    for n, stage in enumerate(det.bundle.stages):
        layer = det.bundle.module.stages[n]
        w, b = layer.weight.double(), layer.bias.double()
        logit_grid = torch.zeros(2, gh, gw, dtype=torch.float64)
        dist_grid = torch.zeros(1, gh, gw, dtype=torch.float64)
        bank = ref_feats.blocks[stage].double().reshape(-1, tiny_backbone.width)
        for p in range(gh * gw):
            token = feats.blocks[stage][0, p].double()
            adapted = w @ token + b
            adapted = adapted / adapted.norm()
            for c in range(2):
                logit_grid[c, p // gw, p % gw] = 100 * float(adapted @ text[c])
            cos = [float(token @ f / (token.norm() * f.norm())) for f in bank]
            dist_grid[0, p // gw, p % gw] = min(1 - c for c in cos)
        stage_grids.append(logit_grid)
        memory_grids.append(dist_grid)
    up = torch.nn.functional.interpolate
    expected_zero = sum(torch.softmax(up(g[None], size=(240, 240), mode="bilinear", align_corners=True), dim=1)[0, 1]
                        for g in stage_grids)
    expected_memory = sum(up(g[None], size=(240, 240), mode="bilinear", align_corners=True)[0, 0]
                          for g in memory_grids)
    out_zero = det.score(feats, zero)
    assert float(out_zero.scores[0]) == pytest.approx(text_score, abs=1e-5)
    torch.testing.assert_close(out_zero.maps[0].double(), expected_zero, atol=1e-4, rtol=1e-4)
    out_few = det.score(feats, few)
    torch.testing.assert_close(out_few.maps[0].double(), expected_zero + expected_memory, atol=1e-4, rtol=1e-4)
    assert float(out_few.scores[0]) == pytest.approx(text_score + float((expected_zero + expected_memory).max()),
                                                     abs=1e-4)


def test_scoring_runs_the_adapters_packed_once_with_the_module_s_output(tiny_backbone: ClipBackbone,
                                                                        adapters_file: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from inspectd.detectors import fused

    if not fused.available():
        pytest.skip("torch built without oneDNN")
    bundle = load_adapters(adapters_file, tiny_backbone)
    packs: list[int] = []
    original = fused.pack_linear
    monkeypatch.setattr(fused, "pack_linear", lambda layer, *a: packs.append(1) or original(layer, *a))
    tokens = [torch.randn(3, 225, tiny_backbone.width) for _ in bundle.stages]
    with torch.inference_mode():
        for _ in range(2):
            for got, expected in zip(bundle.adapt(tokens), bundle.module(tokens), strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(packs) == len(bundle.stages)  # packed once
    with torch.no_grad():
        bundle.module.stages[0].weight.mul_(2.0)  # changed in place: packed again
    with torch.inference_mode():
        torch.testing.assert_close(bundle.adapt(tokens)[0], bundle.module(tokens)[0], atol=1e-5, rtol=1e-5)
    assert len(packs) == 2 * len(bundle.stages)
    with torch.no_grad():
        bundle.module.stages[0].bias.add_(1.0)  # a bias changed in place: packed again too
    with torch.inference_mode():
        torch.testing.assert_close(bundle.adapt(tokens)[0], bundle.module(tokens)[0], atol=1e-5, rtol=1e-5)
    assert len(packs) == 3 * len(bundle.stages)
    leaf = tokens[0].clone().requires_grad_()  # gradients: the module itself
    bundle.adapt([leaf, *tokens[1:]])[0].sum().backward()
    assert leaf.grad is not None and len(packs) == 3 * len(bundle.stages)


def test_interpolation_path_at_the_native_size_changes_nothing(tiny_backbone: ClipBackbone) -> None:
    pixels = torch.randn(2, 3, 240, 240)
    native = tiny_backbone._embed_tokens(pixels)
    visual = tiny_backbone.visual
    x = visual.conv1(pixels).reshape(2, visual.conv1.out_channels, -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(2, 1, -1)
    forced = visual.ln_pre(torch.cat([cls, x], dim=1) + tiny_backbone._positions(tiny_backbone.grid))
    torch.testing.assert_close(forced, native, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        reference = tiny_backbone.model.encode_image(pixels)
    torch.testing.assert_close(tiny_backbone.forward(pixels, FeatureRequest()).image_embeddings, reference,
                               atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- mosaic
def test_mosaic_moves_image_and_mask_together() -> None:
    rng = np.random.default_rng(0)
    images = [np.full((60, 80, 3), 40 * (i + 1), dtype=np.uint8) for i in range(4)]
    masks = [np.zeros((60, 80), dtype=bool) for _ in range(4)]
    masks[1][10:30, 20:60] = True  # a defect in the top-right image only
    masks[2][:] = rng.random((60, 80)) > 2  # empty
    image, mask = mosaic(images, masks, 100)
    assert image.shape == (100, 100, 3) and mask.shape == (100, 100)
    for i in range(4):
        top, left = (i // 2) * 50, (i % 2) * 50
        assert (image[top:top + 50, left:left + 50] == 40 * (i + 1)).all()
    assert mask[:50, 50:].any() and not mask[:50, :50].any() and not mask[50:].any()
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 50 and ys.max() < 50  # the defect stays in its own cell


def test_mosaic_probability_and_same_category_over_many_draws() -> None:
    samples = [Sample(Path(f"{c}{i}.png"), None, c) for c in ("a", "b") for i in range(50)]
    data = _Data(samples, {"a": list(range(50)), "b": list(range(50, 100))})
    counts, total = 0, 0
    for epoch in range(40):
        plan = plan_batches(data, 16, 0.2, torch.Generator().manual_seed(epoch))
        flat = [item for batch in plan for item in batch]
        assert sorted(i for i, _ in flat) == list(range(100))  # every sample once per epoch
        for index, members in flat:
            total += 1
            if members is not None:
                counts += 1
                assert {samples[m].category for m in members} == {samples[index].category}
    rate = counts / total
    assert abs(rate - 0.2) < 3 * math.sqrt(0.2 * 0.8 / total)  # within 3 sigma of p
    again = plan_batches(data, 16, 0.2, torch.Generator().manual_seed(7))
    assert again == plan_batches(data, 16, 0.2, torch.Generator().manual_seed(7))  # seeded


# ----------------------------------------------------------------------------- training
def test_training_on_real_masks_lowers_the_loss_and_the_feature_cache_works(tiny_backbone: ClipBackbone,
                                                                             tmp_path: Path) -> None:
    categories = open_dataset(DATA / "mvtec_ad", "mvtec", ["grid"]) + open_dataset(DATA / "hazelnut_toy", "folder")
    trainer = AprilGanTrainer(tiny_backbone, AprilGanFitConfig(epochs=4, batch_size=8, lr=1e-2, mosaic_p=0.0,
                                                               seed=1))
    seen: list[float] = []

    class Progress(FitContext):
        pass

    ctx = Progress(on_progress=lambda f, note: seen.append(f))
    artifact = trainer.train(TrainingData(categories=categories, summary={"dataset": "test"}), ctx, tmp_path / "ck",
                             show_progress=False)
    curve = [h["loss"] for h in artifact.training["history"]]
    assert len(curve) == 4 and curve[-1] < 0.6 * curve[0], curve
    n = artifact.training["data"]["images"]
    assert n == sum(len(c.test) for c in categories) and artifact.training["data"]["with_masks"] == 28
    assert trainer.forwards == math.ceil(n / 8)  # epochs 2-4 ran on cached features: adapters only
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    assert artifact.config["stages"] == [0, 1] and artifact.config["image_size"] == 240
    # the feature cache holds what its budget counts: each entry its own storage, not a view of a whole batch
    cached = [t for entry in trainer._cache.values() for t in entry]
    assert cached and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in cached)
    assert trainer._cache_bytes == sum(t.numel() * t.element_size() for t in cached)
    # seeded: the same run gives the same adapters
    again = AprilGanTrainer(tiny_backbone, AprilGanFitConfig(epochs=4, batch_size=8, lr=1e-2, mosaic_p=0.0, seed=1))
    second = again.train(TrainingData(categories=categories), FitContext(), None, show_progress=False)
    for key, tensor in artifact.tensors.items():
        torch.testing.assert_close(second.tensors[key], tensor)


def test_adapters_of_another_backbone_or_version_are_refused_naming_both(tiny_backbone: ClipBackbone,
                                                                         adapters_file: Path, tmp_path: Path) -> None:
    from inspectd.detectors.tiny import write_tiny_checkpoint

    other = ClipBackbone(type(tiny_backbone.spec)(arch="inspectd-tiny", device="cpu", pretrained=str(
        write_tiny_checkpoint(tmp_path / "other-clip", image_size=224, seed=5))))
    with pytest.raises(ArtifactMismatch) as err:
        load_adapters(adapters_file, other)
    assert "other-clip" in str(err.value) and Path(tiny_backbone.spec.pretrained).name in str(err.value)
    assert "inspectd fit aprilgan" in str(err.value)
    module = StageAdapters(tiny_backbone.width, tiny_backbone.embed_dim, 2)
    artifact = adapters_artifact(module, (0, 1), 240, tiny_backbone.identity, {}, {})
    artifact.detector_version = AprilGan.version + 1
    save_artifact(artifact, tmp_path / "future.safetensors")
    with pytest.raises(ArtifactMismatch, match=rf"version {AprilGan.version + 1}.*version {AprilGan.version}"):
        load_adapters(tmp_path / "future.safetensors", tiny_backbone)


def test_fit_cli_trains_and_writes_the_adapters_file(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from inspectd.cli import main
    from inspectd.detectors.artifacts import load_artifact

    out = tmp_path / "adapters.safetensors"
    code = main(["fit", "aprilgan", "--dataset", "folder", "--root", str(DATA / "hazelnut_toy"), "--arch",
                 "inspectd-tiny", "--pretrained", str(tiny_checkpoint), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    artifact = load_artifact(out)
    assert artifact.kind == "learned" and artifact.detector == "aprilgan"
    assert artifact.training["data"]["categories"] == ["hazelnut"] and len(artifact.training["history"]) == 1
    assert artifact.config["fit"]["mosaic_p"] == 0.2 and not (tmp_path / "adapters.safetensors.ckpt").exists()


def test_scores_beside_winclip_in_one_batch(tiny_backbone: ClipBackbone, adapters_file: Path) -> None:
    april = create_detector("aprilgan", tiny_backbone, {"adapters": str(adapters_file)})
    win = create_detector("winclip", tiny_backbone)
    a_state = april.fit(ProductSpec("nut", "hazelnut"), [rgb(HAZELNUT / "good" / "00.png")])
    w_state = win.fit(ProductSpec("nut", "hazelnut"), [rgb(HAZELNUT / "good" / "00.png")])
    frame = rgb(HAZELNUT / "colour" / "07.png")
    before = tiny_backbone.forwards
    both = run([ScoreItem(april, a_state, frame), ScoreItem(win, w_state, frame)])
    assert tiny_backbone.forwards - before == 1  # same model, same 240-px square input: one forward
    [alone] = run([ScoreItem(april, a_state, frame)])
    assert both[0].score == pytest.approx(alone.score, abs=1e-5) and both[0].map.shape == frame.shape[:2]


@pytest.mark.redis
async def test_a_daemon_scores_aprilgan_with_masks_beside_winclip_from_redis(redis_client, redis_url, key_prefix,
                                                                            tmp_path, tiny_backbone,
                                                                            adapters_file) -> None:
    import io

    from inspectd.daemon.app import InspectDaemon
    from inspectd.daemon.config import ProductConfig
    from inspectd.streams.message import frame_fields
    from tests.daemon_helpers import daemon_config, png_bytes, wait_for_results

    config = daemon_config(redis_url, key_prefix, tmp_path, registry={"watch": False},
                           redis={"url": redis_url, "prefix": key_prefix, "lines": ["l1"], "block_ms": 50,
                                  "control_stream": None},
                           batcher={"max_batch_size": 8, "max_delay_ms": 40, "queue_size": 64})
    refs = str(tmp_path / "refs")
    config.products = [
        ProductConfig(id="nut-ag", object_name="hazelnut", detector="aprilgan", references=refs, shots=2,
                      options={"adapters": str(adapters_file)}, mask="full"),
        ProductConfig(id="nut-wc", object_name="hazelnut", references=refs, shots=2, mask="full"),
    ]
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        assert daemon.registry.get("nut-ag").describe()["detector"] == "aprilgan"
        forwards: list[tuple[int, int]] = []
        score = daemon.engine.score

        async def counting(items, frames=None):  # noqa: ANN001, ANN202
            before = tiny_backbone.forwards
            out = await score(items, frames)
            forwards.append((len({item.detector.name for item in items}), tiny_backbone.forwards - before))
            return out

        daemon.engine.score = counting
        image = png_bytes(HAZELNUT / "colour" / "05.png", size=128)
        pipe = redis_client.pipeline(transaction=False)
        for i in range(12):
            product = "nut-ag" if i % 2 == 0 else "nut-wc"
            pipe.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields(product, "l1", f"f{i:02d}", image))
        await pipe.execute()
        results = await wait_for_results(redis_client, key_prefix, 12, timeout=60)
        assert sorted(r["frame_id"] for r in results) == [f"f{i:02d}" for i in range(12)]
        for record in results:
            assert record["detector"] == ("aprilgan" if record["product"] == "nut-ag" else "winclip")
            mask = Image.open(io.BytesIO(record["mask"]))
            assert mask.size == (128, 128)
        assert any(kinds == 2 for kinds, _ in forwards)  # both detectors in one batch ...
        assert all(n == 1 for _, n in forwards)  # ... and one forward per batch
    finally:
        await daemon.shutdown()


def test_vand_summary_is_the_harmonic_mean_of_the_two_f1_max() -> None:
    from inspectd.detectors.evaluation.tables import comparison_for, vand_hmean, with_vand

    rows = with_vand(comparison_for("aprilgan", "mvtec_ad", 0))
    assert rows["bottle"]["vand_hmean"] == pytest.approx(2 * 92.8 * 53.4 / (92.8 + 53.4))
    per_category = [r["vand_hmean"] for c, r in rows.items() if c != "mean"]
    assert len(per_category) == 15 and rows["mean"]["vand_hmean"] == pytest.approx(np.mean(per_category))
    assert math.isnan(vand_hmean(float("nan"), 0.5))


def test_published_masks_are_not_clipped_for_maps_above_one(tiny_backbone: ClipBackbone, adapters_file: Path) -> None:
    """APRIL-GAN's map sums stage probabilities (and few-shot distances): up to 3 per stage. The published 8-bit
    mask maps mask_scale to 255, so nothing saturates, and readers scale it back."""
    import io

    from inspectd.streams.records import MaskPolicy, encode_result_mask
    from inspectd.streams.schema import Result

    det = create_detector("aprilgan", tiny_backbone, {"adapters": str(adapters_file)})
    few = det.fit(ProductSpec("nut", "hazelnut"), [rgb(HAZELNUT / "good" / "00.png")])
    zero = det.fit(ProductSpec("nut", "hazelnut"), [])
    assert det.mask_scale(zero) == 2.0 and det.mask_scale(few) == 6.0  # 2 stages on the tiny tower
    [out] = run([ScoreItem(det, few, rgb(HAZELNUT / "colour" / "02.png"))])
    assert out.map.max() > 1.0  # a map a [0, 1] mask would have clipped
    result = Result("nut", "l", "f", 0.0, out.score, "NG", 0.5, "aprilgan", "1", mask=out.map,
                    mask_scale=det.mask_scale(few))
    png, _ = encode_result_mask(result, MaskPolicy.parse("full"))
    raw = np.asarray(Image.open(io.BytesIO(png)))
    assert raw.max() < 255  # not saturated
    back = raw.astype(np.float32) / 255.0 * result.mask_scale
    np.testing.assert_allclose(back, out.map, atol=result.mask_scale / 255.0 + 1e-6)


def test_scoring_uses_the_temperature_the_adapters_were_trained_with(tiny_backbone: ClipBackbone,
                                                                     tmp_path: Path) -> None:
    """`inspectd fit aprilgan --logit-scale 10` records 10 in the adapters file: scoring with them uses 10 unless
    the product's `logit_scale` option says otherwise (it used 100 whatever they were trained with)."""
    torch.manual_seed(3)
    module = StageAdapters(tiny_backbone.width, tiny_backbone.embed_dim, 2)
    path = tmp_path / "adapters-t10.safetensors"
    save_artifact(adapters_artifact(module, (0, 1), 240, tiny_backbone.identity, {"logit_scale": 10.0},
                                    {"history": []}), path)
    image = rgb(HAZELNUT / "colour" / "01.png")

    def scored(options: dict) -> tuple[float, np.ndarray]:
        detector = create_detector("aprilgan", tiny_backbone, {"adapters": str(path), **options})
        [out] = run([ScoreItem(detector, detector.fit(ProductSpec("nut", "hazelnut"), []), image=image)])
        return out.score, out.map

    default, ten, hundred = scored({}), scored({"logit_scale": 10.0}), scored({"logit_scale": 100.0})
    assert default[0] == pytest.approx(ten[0], abs=1e-6)
    np.testing.assert_allclose(default[1], ten[1], atol=1e-6)
    assert abs(default[0] - hundred[0]) > 1e-3
    assert create_detector("aprilgan", tiny_backbone, {"adapters": str(path)}).logit_scale == 10.0


def test_an_input_size_off_the_patch_grid_is_refused_naming_the_sizes_that_fit(tiny_backbone: ClipBackbone,
                                                                               adapters_file: Path) -> None:
    """250 px with 16 px patches: the 15 x 15 grid covers 240 px, and its map was stretched over 250 (4 % off)."""
    patch = tiny_backbone.patch_size
    size = 15 * patch + patch // 2
    fits = rf"multiple of the model's patch size {patch}.*use {15 * patch} or {16 * patch}"
    with pytest.raises(ValueError, match=fits):
        create_detector("aprilgan", tiny_backbone, {"adapters": str(adapters_file), "image_size": size})
    assert create_detector("aprilgan", tiny_backbone, {"adapters": str(adapters_file),
                                                       "image_size": 16 * patch}).input_spec().size == 16 * patch


def test_training_preprocesses_as_scoring_does(tiny_checkpoint: Path) -> None:
    """The trainer built its own Preprocessor: OpenAI's mean/std and an exact resize whatever the backbone said
    (model.resize: fast, the weights' own normalisation), so adapters learnt on other pixels than they score."""
    from inspectd.detectors.backbone import ModelSpec
    from inspectd.detectors.preprocess import InputSpec

    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", device="cpu", pretrained=str(tiny_checkpoint),
                                  resize="fast"))
    trainer = AprilGanTrainer(fast, AprilGanFitConfig(epochs=1, image_size=240))
    scoring = fast.preprocessor_for(InputSpec(240, "square"))
    assert trainer.preprocess == scoring and trainer.preprocess.resize == "fast"
