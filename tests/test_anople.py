"""AnoPLe's parts on the tiny CLIP: Perlin pseudo-anomalies, coupling shapes, gradients, each loss term by hand,
the decoder's size, the prompted tower's CLS index, and scoring = the spec's harmonic fusion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inspectd.detectors.anople import losses as L
from inspectd.detectors.anople.model import AnoPleModel, Architecture, Decoder, scaled_layers
from inspectd.detectors.anople.synthesis import SynthesisConfig, multi_views, perlin_noise, synthesize
from inspectd.detectors.anople.tower import PROMPTS, TOWER, VIEW, anople_forward
from inspectd.detectors.anople.training import Recipe, StepRunner, prepare_samples
from inspectd.detectors.backbone import FeatureRequest
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.building import ThresholdPolicy
from inspectd.detectors.memory import association_min_distance
from inspectd.detectors.pipeline import ScoreItem, run, score_images
from tests.daemon_helpers import HAZELNUT


def rgb(path: Path, size: int | None = None) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    return np.asarray(image.resize((size, size)) if size else image)


@pytest.fixture(scope="module")
def nut() -> np.ndarray:
    return rgb(HAZELNUT / "good" / "00.png", 480)


# ------------------------------------------------------------------------------------------------ synthesis
def test_perlin_mask_is_exactly_the_altered_pixels_seeded_and_within_coverage_bounds(nut: np.ndarray,
                                                                                     tmp_path: Path) -> None:
    config = SynthesisConfig(min_cover=0.05, max_cover=0.2)
    covers = []
    for seed in range(8):
        out = synthesize(nut, config, np.random.default_rng(seed))
        assert np.array_equal(out.mask, (out.image != nut).any(axis=-1))  # mask == altered pixels, exactly
        assert not (out.mask & ~out.region).any() and out.mask.sum() >= 0.9 * out.region.sum()
        covers.append(out.region.mean())
        again = synthesize(nut, config, np.random.default_rng(seed))
        assert np.array_equal(again.image, out.image) and np.array_equal(again.mask, out.mask)
    assert all(0.05 - 1e-3 <= c <= 0.2 + 1e-3 for c in covers), covers
    assert len({round(c, 4) for c in covers}) > 4  # coverage is drawn, not fixed
    other = synthesize(nut, config, np.random.default_rng(99))
    assert not np.array_equal(other.mask, synthesize(nut, config, np.random.default_rng(0)).mask)
    textures = tmp_path / "textures"
    textures.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(textures / "t.png")
    textured = synthesize(nut, SynthesisConfig(texture_dir=str(textures)), np.random.default_rng(1))
    assert np.array_equal(textured.mask, (textured.image != nut).any(axis=-1)) and textured.mask.any()


def test_perlin_noise_is_smooth_gradient_noise_and_views_are_the_full_image_plus_four_crops(nut: np.ndarray) -> None:
    noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= math.sqrt(2) + 1e-6
    assert np.allclose(noise[::16, ::16], 0.0, atol=1e-9)  # zero at every lattice point
    views = multi_views(nut, 240)
    big = np.asarray(Image.fromarray(nut).resize((480, 480), Image.Resampling.BICUBIC))
    assert [v.shape for v in views] == [(240, 240, 3)] * 5
    assert np.array_equal(views[2], big[:240, 240:]) and np.array_equal(views[4], big[240:, 240:])


# ------------------------------------------------------------------------------------------------ model
def test_coupling_shapes_and_depths(tiny_backbone: Any) -> None:
    model = AnoPleModel(tiny_backbone, Architecture(text_ctx=5, visual_ctx=8), torch.Generator().manual_seed(0))
    width, text_width = tiny_backbone.width, tiny_backbone.model.token_embedding.weight.shape[1]
    j = model.arch.prompt_depth
    assert j == 2  # 9 of 12 layers scaled to the tiny model's 2 blocks
    assert scaled_layers(12, (9,)) == (9,) and scaled_layers(24, (9,)) == (18,) and scaled_layers(6, (9,)) == (5,)
    assert scaled_layers(12, (7, 8, 9, 10)) == (7, 8, 9, 10) and scaled_layers(2, (7, 8, 9, 10)) == (2,)
    assert tuple(model.t2v.weight.shape) == (width, text_width) and tuple(model.v2t.weight.shape) == (text_width,
                                                                                                      width)
    assert tuple(model.visual_prompts().shape) == (j, 8 + 5, width)  # [P_v, f_t→v(P_t)]
    assert tuple(model.text_prompts().shape) == (j, 5 + 8, text_width)  # [P_t, f_v→t(P_v)]
    torch.testing.assert_close(model.visual_prompts()[:, 8:], model.t2v(model.text_ctx))
    torch.testing.assert_close(model.text_prompts()[:, 5:], model.v2t(model.visual_ctx))
    assert tuple(model.view_tokens.shape) == (5, width)
    text = model.text_features(tiny_backbone, ["hazelnut", "grid"])
    assert tuple(text.shape) == (2, 2, tiny_backbone.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2, 2))


def test_per_layer_couplings_are_an_option(tiny_backbone: Any, nut: np.ndarray) -> None:
    recipe = Recipe(per_layer_coupling=True, multi_view=False)
    model = AnoPleModel(tiny_backbone, recipe.architecture(), torch.Generator().manual_seed(0))
    assert len(model.t2v) == len(model.v2t) == model.arch.prompt_depth == 2
    torch.testing.assert_close(model.visual_prompts()[1, 3:], model.t2v[1](model.text_ctx[1]))
    runner = StepRunner(tiny_backbone, model, recipe, ["hazelnut"])
    runner.terms(runner.views(prepare_samples(tiny_backbone, [("hazelnut", nut)]), [0])).total().backward()
    assert all(p.grad is not None and bool((p.grad != 0).any()) for p in model.parameters())


def test_the_decoder_output_size(tiny_backbone: Any) -> None:
    decoder = Decoder(896, 640, 640, 30)
    assert tuple(decoder(torch.randn(2, 225, 896), (15, 15)).shape) == (2, 640, 30, 30)  # ViT-B-16+ at 240
    model = AnoPleModel(tiny_backbone, Architecture(decoder_size=48))
    tokens = torch.randn(3, 225, tiny_backbone.width)
    assert tuple(model.decoder(tokens, (15, 15)).shape) == (3, tiny_backbone.embed_dim, 48, 48)


def test_gradients_reach_every_learnable_part_and_no_clip_weight(tiny_backbone: Any, nut: np.ndarray) -> None:
    recipe = Recipe()
    model = AnoPleModel(tiny_backbone, recipe.architecture(), torch.Generator().manual_seed(0))
    runner = StepRunner(tiny_backbone, model, recipe, ["hazelnut"])
    rows = runner.views(prepare_samples(tiny_backbone, [("hazelnut", nut)]), [3])
    assert rows.pixels.shape[0] == 10 and sorted(rows.views.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert rows.labels[:5].sum() == 0 and rows.labels[5] == 1  # normal views +, the abnormal full view −
    terms = runner.terms(rows)
    terms.total().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool((param.grad != 0).any()), name
    for j in range(model.arch.prompt_depth):  # every prompted layer of both towers, every view token
        assert bool((model.text_ctx.grad[j] != 0).any()) and bool((model.visual_ctx.grad[j] != 0).any())
    assert all(bool((model.view_tokens.grad[v] != 0).any()) for v in range(5))
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def test_the_cls_is_pooled_at_its_real_index_with_prompts_prepended(tiny_backbone: Any, nut: np.ndarray) -> None:
    """With J = 1 the tower equals the shared `prompted_forward` (CLS first, prompts after it) given the same
    tokens: self-attention without masks is order-free, so only the pooled index can make them differ."""
    pixels = tiny_backbone.preprocessor(rgb(HAZELNUT / "good" / "01.png", 240))[0]
    generator = torch.Generator().manual_seed(0)
    prompts, view = torch.randn(1, 1, 6, tiny_backbone.width, generator=generator), torch.randn(1, 64,
                                                                                                generator=generator)
    request = FeatureRequest(tower=TOWER, patch_tokens=True, blocks=frozenset({0, 1}))
    ours = tiny_backbone.forward(pixels, request, {PROMPTS: prompts, VIEW: view})
    shared = tiny_backbone.prompted_forward(pixels, FeatureRequest(patch_tokens=True, blocks=frozenset({0, 1})),
                                            torch.cat([view[:, None, None], prompts], dim=2))
    torch.testing.assert_close(ours.image_embeddings, shared.image_embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.patch_tokens, shared.patch_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.blocks[1], shared.blocks[1], rtol=1e-4, atol=1e-5)
    # index 0 of the prompted sequence is the view token, not the CLS: pooling it would give something else
    x = torch.cat([view[:, None], prompts[:, 0], tiny_backbone._embed_tokens(pixels)], dim=1)
    x = tiny_backbone.visual.transformer(x)
    wrong = tiny_backbone._project(x[:, 0])
    right = tiny_backbone._project(x[:, 7])
    torch.testing.assert_close(right, ours.image_embeddings, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(wrong, ours.image_embeddings, atol=1e-3)
    # deep (J = 2) with the view token re-inserted at every layer: again the shared tower's maths, reordered
    deep, views = torch.randn(1, 2, 6, 64, generator=generator), torch.randn(1, 2, 64, generator=generator)
    ours = tiny_backbone.forward(pixels, request, {PROMPTS: deep, VIEW: views})
    shared = tiny_backbone.prompted_forward(pixels, FeatureRequest(patch_tokens=True), torch.cat([views[:, :, None],
                                                                                                  deep], dim=2))
    torch.testing.assert_close(ours.image_embeddings, shared.image_embeddings, rtol=1e-4, atol=1e-5)
    input_only = tiny_backbone.forward(pixels, request, {PROMPTS: deep, VIEW: views[:, 0]})
    assert not torch.allclose(input_only.image_embeddings, ours.image_embeddings, atol=1e-4)
    with torch.enable_grad():  # differentiable when called directly (training)
        prompts.requires_grad_(True)
        anople_forward(tiny_backbone, pixels, request, {PROMPTS: prompts, VIEW: view}).image_embeddings.sum().backward()
        assert prompts.grad is not None and bool((prompts.grad != 0).any())


# ------------------------------------------------------------------------------------------------ losses
def test_each_loss_term_against_hand_computed_values() -> None:
    # pixel: dice (smooth 1) + focal (gamma 2, the shared loss's smoothing 1e-5) on a 1 x 1 x 2 map
    prob, mask = torch.tensor([[[0.8, 0.1]]]), torch.tensor([[[1.0, 0.0]]])
    dice = 1 - (2 * 0.8 + 1) / (0.9 + 1 + 1)
    s = 1e-5
    p_t = [(1 - s) * 0.8 + s * 0.2 + s, (1 - s) * 0.9 + s * 0.1 + s]
    focal = sum(-(1 - p) ** 2 * math.log(p) for p in p_t) / 2
    assert float(L.pixel_loss(prob, mask)) == pytest.approx(dice + focal, rel=1e-5)
    # image CE: logits = scale * cos(z, w±)
    text = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), dim=-1)
    z = torch.tensor([[3.0, 4.0]])  # cos = 0.6, 0.8
    logits = L.image_logits(z, text, 10.0)
    torch.testing.assert_close(logits, torch.tensor([[6.0, 8.0]]))
    p_abnormal = math.exp(8) / (math.exp(6) + math.exp(8))
    assert float(L.image_loss(logits, torch.tensor([0]))) == pytest.approx(-math.log(1 - p_abnormal), rel=1e-6)
    # latent CE: z⁻ = normalize(z) + ε with label − and label smoothing 0.003 over the two classes
    noise = torch.tensor([[0.0, 0.2]])
    noisy = torch.tensor([[0.6, 1.0]]) / math.hypot(0.6, 1.0)
    l0, l1 = 10 * noisy[0, 0].item(), 10 * noisy[0, 1].item()
    log_p = [l - math.log(math.exp(l0) + math.exp(l1)) for l in (l0, l1)]
    expected = -(1 - 0.003) * log_p[1] - 0.003 / 2 * (log_p[0] + log_p[1])
    assert float(L.latent_loss(z, text, noise, 10.0, 0.003)) == pytest.approx(expected, rel=1e-5)
    # alignment: s = Σ softmax(abnormal logit / τ) · D; L = 1 − cos(z⁰, s)
    dense = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, D=2, h=1, w=2]: D_0 = (1, 0), D_1 = (0, 1)
    abnormal = torch.tensor([[[0.0, 2.0]]])
    w1 = math.exp(1.0) / (1 + math.exp(1.0))  # τ = 2
    pooled = (1 - w1, w1)
    cos = (3 * pooled[0] + 4 * pooled[1]) / (5 * math.hypot(*pooled))
    assert float(L.alignment_loss(z, dense, abnormal, 2.0)) == pytest.approx(1 - cos, rel=1e-5)


# ------------------------------------------------------------------------------------------------ scoring
def test_star_scores_are_the_spec_fusion_and_batched_equals_one_by_one(tiny_backbone: Any) -> None:
    refs = [rgb(HAZELNUT / "good" / f"{i:02d}.png", 128) for i in range(2)]
    detector = create_detector("anople-star", tiny_backbone, {"epochs": 2, "multi_view": False})
    state = detector.fit(ProductSpec("nut", "hazelnut"), refs)
    assert state.meta["steps_run"] == 4 and len(state.meta["history"]) == 2
    frames = [rgb(HAZELNUT / "colour" / f"{i:02d}.png", 160) for i in range(2)]
    tiles = torch.cat([detector.preprocessor(f)[0] for f in frames])
    feats = tiny_backbone.forward(tiles, detector.feature_request(state), {
        k: v.expand(2, *v.shape[1:]) for k, v in detector.tower_inputs(state).items()})
    p_img, m_hat, m_mem = detector.maps(feats, state)
    memory = association_min_distance(detector.layer_mean(feats), state.tensors["memory"]).reshape(2, 15, 15)
    torch.testing.assert_close(m_mem, L.upsample(memory, 240))
    fused = 1 / (1 / m_hat + 1 / m_mem)
    expected = 1 / (1 / p_img + 1 / fused.flatten(1).max(dim=1).values)
    out = detector.score(feats, state)
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.maps, fused, rtol=1e-5, atol=1e-7)
    batched = run([ScoreItem(detector, state, f) for f in frames])
    single = [run([ScoreItem(detector, state, f)])[0] for f in frames]
    assert [o.score for o in batched] == pytest.approx([o.score for o in single], rel=1e-5)
    assert batched[0].map.shape == (160, 160)
    text_only = create_detector("anople-star", tiny_backbone, {"epochs": 2, "multi_view": False,
                                                               "use_memory": False})
    out = text_only.score(feats, state)
    torch.testing.assert_close(out.scores, p_img)
    torch.testing.assert_close(out.maps, m_hat)


def test_a_stopped_star_fit_resumes_to_the_same_state_and_a_saved_state_reloads(tiny_backbone: Any,
                                                                                tmp_path: Path) -> None:
    from inspectd.detectors.building import StateCache, build_product
    from inspectd.detectors.context import FitContext, FitStopped

    refs = [rgb(HAZELNUT / "good" / f"{i:02d}.png", 128) for i in range(2)]
    options = {"epochs": 3, "multi_view": False}
    detector = create_detector("anople-star", tiny_backbone, options)
    spec = ProductSpec("nut", "hazelnut")
    whole = detector.fit(spec, refs, FitContext(seed=3, checkpoint_dir=tmp_path / "a"))
    ctx = FitContext(seed=3, checkpoint_dir=tmp_path / "b")
    ctx.on_progress = lambda fraction, note: ctx.stop() if "epoch 1/3 step 2/2" in note else None
    with pytest.raises(FitStopped):
        detector.fit(spec, refs, ctx)
    resumed = detector.fit(spec, refs, FitContext(seed=3, checkpoint_dir=tmp_path / "b"))
    assert resumed.meta["resumed_from_epoch"] == 1 and resumed.meta["history"] == whole.meta["history"]
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)
    built = build_product(detector, spec, refs, policy=ThresholdPolicy(), ctx=FitContext(seed=3))
    assert built.calibration["shifted_views"] == 8
    cache = StateCache(tmp_path / "cache")
    built.fingerprint = "f" * 20
    cache.store(detector, "nut", built)
    loaded = cache.load(create_detector("anople-star", tiny_backbone, options), "nut", "f" * 20)
    frames = [rgb(HAZELNUT / "colour" / "00.png", 128)]
    assert loaded is not None
    assert score_images(detector, loaded.state, frames) == pytest.approx(score_images(detector, built.state, frames))


def test_products_of_different_prompt_layouts_get_separate_forwards(tiny_backbone: Any) -> None:
    refs = [rgb(HAZELNUT / "good" / "00.png", 128)]
    spec = ProductSpec("nut", "hazelnut")
    a = create_detector("anople-star", tiny_backbone, {"epochs": 1, "multi_view": False})
    b = create_detector("anople-star", tiny_backbone, {"epochs": 1, "multi_view": False, "visual_ctx": 5,
                                                       "view_token_every_layer": True})
    state_a, state_b = a.fit(spec, refs), b.fit(spec, refs)
    assert tuple(state_b.tensors["view_token"].shape) == (2, tiny_backbone.width)
    assert a.feature_request(state_a).tower == "anople/J2/P6"
    assert b.feature_request(state_b).tower == "anople/J2/P8/view-every-layer"
    frame = rgb(HAZELNUT / "colour" / "01.png", 128)
    before = tiny_backbone.forwards
    mixed = run([ScoreItem(a, state_a, frame), ScoreItem(b, state_b, frame), ScoreItem(a, state_a, frame)])
    assert tiny_backbone.forwards - before == 2  # one per layout, not a failed batch
    assert mixed[1].score == pytest.approx(run([ScoreItem(b, state_b, frame)])[0].score, rel=1e-5)
    assert mixed[0].score == pytest.approx(mixed[2].score, rel=1e-6)


def test_the_class_word_is_the_real_class_name(tiny_backbone: Any) -> None:
    """Spec §2.3: the class word is the real class name ("pcb4"), so the four VisA PCBs keep four prototypes in
    the multi-class model (PromptAD's mapping to "printed circuit board" gave them one)."""
    from inspectd.detectors.anople.model import class_word

    assert [class_word(c, c) for c in ("pcb1", "pcb4", "macaroni2", "hazelnut")] == \
        ["pcb1", "pcb4", "macaroni2", "hazelnut"]
    assert class_word("metal_nut", "metal nut") == "metal nut"  # eval's object name: the folder's, spaced
    assert class_word("line-7", "bracket") == "bracket"  # a daemon product: its object name
    model = AnoPleModel(tiny_backbone, Architecture(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        normal = model.text_features(tiny_backbone, [class_word(c, c) for c in ("pcb1", "pcb2")])
    assert not torch.allclose(normal[0], normal[1])
