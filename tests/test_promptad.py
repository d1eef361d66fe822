"""PromptAD (inspectd/detectors/promptad): the V-V tower against a naive dual path, each loss term against hand
values, the prompt layout against the cached text path, gradients reaching only the prompts, seeded and resumable
fits, the fusion formulas, one forward per batch for two products, calibration without re-training, and the
detector in a real daemon (Redis) and in `inspectd eval`.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inspectd.cli import main as cli_main
from inspectd.daemon.app import InspectDaemon
from inspectd.detectors.backbone import FeatureRequest
from inspectd.detectors.base import ProductSpec, create_detector, detector_class
from inspectd.detectors.building import StateCache, ThresholdPolicy, build_product
from inspectd.detectors.context import FitContext, FitStopped
from inspectd.detectors.pipeline import ScoreItem, run, score_images
from inspectd.detectors.promptad import PromptAd, gaussian_blur
from inspectd.detectors.promptad import prompts as PP
from inspectd.detectors.promptad.losses import alignment_loss, contrastive_loss, margin_loss, promptad_terms
from inspectd.detectors.promptad.tower import TOWER, memory_blocks, vv_forward
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import (
    DATA,
    HAZELNUT,
    one_line_config,
    png_bytes,
    read_stream,
    wait_for_results,
)

MVTEC = DATA / "mvtec_ad"

TOKEN = "promptad-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = ProductSpec("hazelnut", "hazelnut")
FAST = {"steps": 12}


def load(folder: str, names: range | list[int]) -> list[np.ndarray]:
    return [np.asarray(Image.open(HAZELNUT / folder / f"{i:02d}.png").convert("RGB")) for i in names]


@pytest.fixture(scope="module")
def refs() -> list[np.ndarray]:
    return load("good", range(4))


@pytest.fixture(scope="module")
def fitted(tiny_backbone: Any, refs: list[np.ndarray]) -> tuple[PromptAd, Any]:
    detector = create_detector("promptad", tiny_backbone, FAST)
    return detector, detector.fit(SPEC, refs)


# ------------------------------------------------------------------------------------------------ V-V tower
def naive_dual_path(backbone: Any, pixels: torch.Tensor, blocks: set[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     dict[int, torch.Tensor]]:
    """Per-head loops with explicit softmax(q kᵀ·scale) / softmax(v vᵀ·scale); original path = open_clip's block."""
    visual = backbone.visual
    x = backbone._embed_tokens(pixels)
    x_vv = x.clone()
    taps = {}
    for i, block in enumerate(visual.transformer.resblocks):
        attn = block.attn
        width, heads = x.shape[-1], attn.num_heads
        d = width // heads
        h = block.ln_1(x)
        q, k, v = (h @ attn.in_proj_weight[j * width:(j + 1) * width].T + attn.in_proj_bias[j * width:(j + 1) * width]
                   for j in range(3))
        outs = []
        for head in range(heads):
            vh = v[..., head * d:(head + 1) * d]
            weights = torch.softmax(vh @ vh.transpose(1, 2) * d ** -0.5, dim=-1)
            outs.append(weights @ vh)
        x_vv = x_vv + torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
        for head in range(heads):  # the original path by hand too, checked against open_clip's block below
            qh, kh, vh = (t[..., head * d:(head + 1) * d] for t in (q, k, v))
            outs[head] = torch.softmax(qh @ kh.transpose(1, 2) * d ** -0.5, dim=-1) @ vh
        by_hand = x + torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
        by_hand = by_hand + block.mlp(block.ln_2(by_hand))
        x = block(x)
        torch.testing.assert_close(by_hand, x, rtol=1e-4, atol=1e-5)
        if i in blocks:
            taps[i] = x[:, 1:]
    pooled = visual.ln_post(x[:, 0]) @ visual.proj
    tokens = visual.ln_post(x_vv[:, 1:]) @ visual.proj
    return pooled, tokens, taps


def test_vv_tower_matches_a_naive_dual_path_and_the_plain_tower(tiny_backbone: Any) -> None:
    pixels = torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    request = FeatureRequest(tower=TOWER, blocks=frozenset({0, 1}), patch_embeddings=True, patch_tokens=True)
    features = tiny_backbone.forward(pixels, request)
    with torch.no_grad():
        pooled, tokens, taps = naive_dual_path(tiny_backbone, pixels, {0, 1})
    torch.testing.assert_close(features.image_embeddings, pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.patch_embeddings, tokens, rtol=1e-4, atol=1e-5)
    for block in (0, 1):
        torch.testing.assert_close(features.blocks[block], taps[block], rtol=1e-4, atol=1e-5)
    assert features.patch_tokens.shape == (3, 225, tiny_backbone.width) and features.grid == (15, 15)
    plain = tiny_backbone.forward(pixels, FeatureRequest(blocks=frozenset({0, 1}), patch_embeddings=True))
    torch.testing.assert_close(features.image_embeddings, plain.image_embeddings, rtol=1e-4, atol=1e-5)  # same CLS
    torch.testing.assert_close(features.blocks[1], plain.blocks[1], rtol=1e-4, atol=1e-5)
    assert (features.patch_embeddings - plain.patch_embeddings).abs().max() > 1e-3  # the V-V tokens differ
    one = vv_forward(tiny_backbone, pixels[1:2], request)  # batching never changes a row
    torch.testing.assert_close(one.patch_embeddings[0], features.patch_embeddings[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        tiny_backbone.forward(pixels, FeatureRequest(tower=TOWER, windows=frozenset({2})))


def test_memory_layers_are_3_and_8_of_12_scaled_to_the_depth(tiny_backbone: Any) -> None:
    assert memory_blocks(12) == (2, 7) and memory_blocks(24) == (5, 15) and memory_blocks(2) == (0, 1)
    assert memory_blocks(12, (6, 9)) == (5, 8)
    with pytest.raises(ValueError, match="within 1..2"):
        memory_blocks(2, (3,))
    assert PromptAd(tiny_backbone).feature_request().blocks == frozenset({0, 1})
    assert PromptAd(tiny_backbone, {"use_memory": False}).feature_request().blocks == frozenset()


# ------------------------------------------------------------------------------------------------ losses
def test_each_loss_term_against_hand_computed_values() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    normal = torch.tensor([[2.0, 0.0]])  # n̄ = (1, 0)
    manual, learned = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, -1.0]])  # ā = normalize((0, 1)) = (0, 1)
    s = 2.0
    anomalies = F.normalize(torch.cat([manual, learned]), dim=-1)
    # row 1: logits s·(1, 0, 0); row 2: s·(0, 1, -1); CE target 0
    ce = 0.5 * (math.log(1 + 2 * math.exp(-2)) + math.log(1 + math.exp(2) + math.exp(-2)))
    assert contrastive_loss(f, torch.tensor([1.0, 0.0]), anomalies, s).item() == pytest.approx(ce, rel=1e-6)
    # squared distances: row 1 (0 to n̄, 2 to ā) -> max(0, -2 + r); row 2 (2, 0) -> max(0, 2 + r)
    n_bar, a_bar = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert margin_loss(f, n_bar, a_bar).item() == pytest.approx(1.0)
    assert margin_loss(f, n_bar, a_bar, margin=3.0).item() == pytest.approx((1.0 + 5.0) / 2)
    assert alignment_loss(manual, learned).item() == pytest.approx(4.0)  # ||(0, 1) - (0, -1)||²
    terms = promptad_terms(f, normal, manual, learned, scale=s)
    assert terms.total(0.001).item() == pytest.approx(ce + 1.0 + 0.004, rel=1e-6)
    # patches [B, L, D] are rows like any other
    assert contrastive_loss(f[None], n_bar, anomalies, s).item() == pytest.approx(ce, rel=1e-6)
    assert margin_loss(f[None], n_bar, a_bar).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ prompts
def test_suffix_lists_class_names_and_defect_words() -> None:
    assert len(PP.MVTEC_SUFFIXES) == 15 and len(PP.VISA_SUFFIXES) == 12
    hazelnut = PP.anomaly_suffixes("hazelnut", "hazelnut", ("dent", "crack"))
    assert hazelnut == (*PP.GENERIC_SUFFIXES["paper"], "{} with crack", "{} with cut", "{} with hole",
                        "{} with print", "{} with dent")  # the defect word "crack" is already there
    assert PP.anomaly_suffixes("line-7", "metal nut", ())[-1] == "{} with scratch"  # object name as the key
    assert PP.anomaly_suffixes("line-7", "widget", (), generic="code") == PP.GENERIC_SUFFIXES["code"]
    assert PP.anomaly_suffixes("hazelnut", "hazelnut", (), builtin=False) == PP.GENERIC_SUFFIXES["paper"]
    assert len(PP.anomaly_suffixes("fryum", "fryum", ())) == 5 + 5  # the published duplicate dropped
    assert PP.prompt_object_name("pcb3", "pcb3") == "printed circuit board"
    assert PP.prompt_object_name("metal_nut", "metal nut") == "metal nut"
    assert PP.prompt_object_name("pcb3", "my board") == "my board"


def test_prompt_layout_and_the_differentiable_text_path(tiny_backbone: Any) -> None:
    suffixes = PP.anomaly_suffixes("hazelnut", "hazelnut", ())
    prompt_set = PP.PromptSet(tiny_backbone, "hazelnut", suffixes, n_prompts=2, n_anomaly=3,
                              generator=torch.Generator().manual_seed(0))
    assert prompt_set.counts == (2, 2 * 9, 2 * 3)
    assert prompt_set.texts["learned"][0] == "N N N N A hazelnut." and len(prompt_set.texts["manual"]) == 18
    embeddings, eot = prompt_set.embeddings()
    torch.testing.assert_close(embeddings[1, 1:5], prompt_set.normal_ctx[1])
    torch.testing.assert_close(embeddings[2 + 5, 1:5], prompt_set.normal_ctx[1])  # MAP row s·N + i -> context i
    learned = embeddings[20:]
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(learned[i * 3 + j, 1:5], prompt_set.normal_ctx[i])
            torch.testing.assert_close(learned[i * 3 + j, 5], prompt_set.abnormal_ctx[j, 0])
    torch.testing.assert_close(embeddings[0, 5:], prompt_set.normal_embeddings[0, 5:])  # the rest untouched
    assert set(dict(prompt_set.state_dict())) == {"normal_ctx", "abnormal_ctx"}  # buffers are not state
    # contexts set to the words' own embeddings: the learnable path reproduces the cached text encoder
    _, words = tiny_backbone.tokenize(["a photo of the hazelnut."])
    with torch.no_grad():
        prompt_set.normal_ctx.copy_(words[0, 1:5].expand(2, -1, -1))
    normal, _, _ = PP.encode_sets(tiny_backbone, [prompt_set])[0]
    expected = tiny_backbone.encode_text(["a photo of the hazelnut."])
    torch.testing.assert_close(F.normalize(normal, dim=-1), expected.expand(2, -1), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ fit
def test_gradients_reach_only_the_prompts_and_fits_are_seeded(tiny_backbone: Any, refs: list[np.ndarray],
                                                              fitted: tuple[PromptAd, Any]) -> None:
    detector, state = fitted
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    module = detector.prompt_module(SPEC, seed=0)
    feats = detector.reference_features(refs[:1], detector.feature_request())
    visual = {"image": F.normalize(feats.image_embeddings.clone(), dim=-1),
              "pixel": F.normalize(feats.patch_embeddings.clone(), dim=-1)}
    sum(t.total(0.001) for t in detector.loss_terms(module, visual).values()).backward()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    again = detector.fit(SPEC, refs)
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # CLIP bit-identical after fits
    assert set(state.tensors) == set(again.tensors) and all(torch.equal(state.tensors[k], again.tensors[k])
                                                            for k in state.tensors)
    other = detector.fit(SPEC, refs, FitContext(seed=1))
    assert not torch.equal(other.tensors["normal_ctx_image"], state.tensors["normal_ctx_image"])
    history = [row["loss"] for row in state.meta["history"]]
    assert len(history) == 12 and history[-1] < 0.8 * history[0], history  # the loss goes down
    assert state.meta["prompts"]["pixel"]["manual"][5] == "N N N N hazelnut with crack."
    assert state.tensors["normal_ctx_image"].shape == (1, 4, 64) and state.tensors["text_pixel"].shape == (2, 64)
    assert state.tensors["memory_block_0"].shape == (4 * 225, 64)
    with pytest.raises(ValueError, match="k >= 1"):
        detector.fit(SPEC, [])


def test_a_stopped_fit_resumes_from_its_checkpoint_to_the_same_prompts(tiny_backbone: Any, refs: list[np.ndarray],
                                                                       fitted: tuple[PromptAd, Any],
                                                                       tmp_path: Path) -> None:
    detector, straight = fitted
    ctx = FitContext(checkpoint_dir=tmp_path / "ckpt")

    def stop_midway(fraction: float, note: str) -> None:
        if "epoch 6/12" in note:
            ctx.stop()

    ctx.on_progress = stop_midway
    with pytest.raises(FitStopped):
        detector.fit(SPEC, refs, ctx)
    assert (tmp_path / "ckpt" / "loop.safetensors").is_file()
    resumed = detector.fit(SPEC, refs, FitContext(checkpoint_dir=tmp_path / "ckpt"))
    assert resumed.meta["resumed_from_epoch"] == 6 and resumed.meta["steps_run"] == 6
    assert resumed.meta["history"] == straight.meta["history"]
    for name in ("normal_ctx_image", "abnormal_ctx_pixel", "text_image", "text_pixel"):
        torch.testing.assert_close(resumed.tensors[name], straight.tensors[name], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ scoring
def test_score_is_the_spec_fusion_and_the_text_only_variant(tiny_backbone: Any, fitted: tuple[PromptAd, Any]
                                                            ) -> None:
    detector, state = fitted
    image = load("colour", [3])[0]
    tiles, _ = detector.preprocessor(image)
    features = tiny_backbone.forward(tiles, detector.feature_request(state))
    out = detector.score(features, state)
    scale = math.log(tiny_backbone.logit_scale)  # the raw parameter, as the official code
    g = F.normalize(features.image_embeddings, dim=-1)
    s_t = torch.softmax(scale * g @ state.tensors["text_image"].T, dim=-1)[:, 1]
    t = F.normalize(features.patch_embeddings, dim=-1)
    m_t = torch.softmax(scale * t @ state.tensors["text_pixel"].T, dim=-1)[..., 1]
    m_v = torch.stack([(1 - (F.normalize(features.blocks[b], dim=-1) @ state.tensors[f"memory_block_{b}"].T)
                        .max(dim=-1).values) / 2 for b in (0, 1)]).mean(dim=0)
    up = F.interpolate(m_v.reshape(1, 1, 15, 15), size=(240, 240), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.scores, 1 / (1 / s_t + 1 / up.max()), rtol=1e-5, atol=1e-7)
    fused = F.interpolate((1 / (1 / m_t + 1 / m_v)).reshape(1, 1, 15, 15), size=(240, 240), mode="bilinear",
                          align_corners=False)[:, 0]
    from scipy.ndimage import gaussian_filter

    sigma = detector.options.blur_sigma
    assert sigma == 2.4  # the code's sigma 4 at 400 px, at the 240-px input
    torch.testing.assert_close(out.maps[0], torch.from_numpy(gaussian_filter(fused[0].numpy(), sigma)), rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(gaussian_blur(fused, 4.0)[0], torch.from_numpy(gaussian_filter(fused[0].numpy(), 4.0)),
                               rtol=1e-4, atol=1e-6)
    text_only = create_detector("promptad", tiny_backbone, {**FAST, "use_memory": False})
    plain = text_only.score(features, state)
    torch.testing.assert_close(plain.scores, s_t, rtol=1e-5, atol=1e-7)


def test_two_promptad_products_share_one_forward_per_batch(tiny_backbone: Any, refs: list[np.ndarray],
                                                           fitted: tuple[PromptAd, Any]) -> None:
    detector, nut = fitted
    other_detector = create_detector("promptad", tiny_backbone, {"steps": 3, "blur_sigma": 0.0})
    walnut = other_detector.fit(ProductSpec("walnut", "walnut", ("dent",)), refs[:2], FitContext(seed=3))
    frames = load("colour", [0, 1]) + load("good", [10, 11])
    items = [ScoreItem(d, s, f) for d, s, f in zip([detector, other_detector] * 2, [nut, walnut] * 2, frames,
                                                   strict=True)]
    before = tiny_backbone.forwards
    mixed = run(items)
    assert tiny_backbone.forwards - before == 1
    for item, result in zip(items, mixed, strict=True):
        alone = run([ScoreItem(item.detector, item.state, item.image)])[0]
        assert result.score == pytest.approx(alone.score, rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(result.map, alone.map, rtol=1e-4, atol=1e-6)


def test_calibration_scores_shifted_views_without_retraining(tiny_backbone: Any, refs: list[np.ndarray],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    detector = create_detector("promptad", tiny_backbone, FAST)
    fits = []
    original = PromptAd.fit
    monkeypatch.setattr(PromptAd, "fit", lambda self, *a, **k: fits.append(1) or original(self, *a, **k))
    built = build_product(detector, SPEC, refs, (), ThresholdPolicy(quantile=1.0, margin=0.02))
    assert len(fits) == 1 and built.calibration["shifted_views"] == 16 and built.calibration["leave_one_out"] == 0
    assert built.threshold == pytest.approx(built.calibration["max_normal"] + 0.02)
    bad = score_images(detector, built.state, load("colour", range(6)))
    good = score_images(detector, built.state, load("good", range(10, 16)))
    assert np.mean(bad) > np.mean(good), (bad, good)
    # saved with the product: a reload scores identically without a fit
    cache = StateCache(tmp_path)
    built.fingerprint = "f" * 20
    cache.store(detector, "nut", built)
    loaded = cache.load(create_detector("promptad", tiny_backbone, FAST), "nut", "f" * 20)
    assert loaded is not None and len(fits) == 1
    assert score_images(detector, loaded.state, load("colour", range(2))) == pytest.approx(bad[:2], rel=1e-6)


# ------------------------------------------------------------------------------------------------ daemon
def product(product_id: str, refs_dir: Path, shots: int = 4, **options: Any) -> dict[str, Any]:
    return {"id": product_id, "object_name": "hazelnut", "detector": "promptad", "options": options,
            "references": str(refs_dir), "shots": shots, "mask": "none"}


def config_for(redis_url: str, prefix: str, tmp: Path, products: list[dict[str, Any]]) -> Any:
    return one_line_config(redis_url, prefix, tmp, products, TOKEN)


@pytest.fixture
def refs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "promptad-refs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{i:02d}.png"))
    return folder


@pytest.mark.redis
async def test_daemon_fits_on_hazelnut_and_scores_with_the_result(redis_client, redis_url, key_prefix, tmp_path,
                                                                  refs_dir, tiny_backbone, monkeypatch) -> None:
    config = config_for(redis_url, key_prefix, tmp_path, [product("nut", refs_dir, steps=20)])
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        entry = daemon.registry.get("nut")
        history = [row["loss"] for row in entry.state.meta["history"]]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http, \
                http.get("/products/nut") as response:
            described = await response.json()
        frames = {f"good-{i}": png_bytes(HAZELNUT / "good" / f"{i:02d}.png") for i in range(20, 26)}
        frames |= {f"colour-{i}": png_bytes(HAZELNUT / "colour" / f"{i:02d}.png") for i in range(6)}
        for frame_id, data in frames.items():
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields("nut", "l1", frame_id, data))
        results = await wait_for_results(redis_client, key_prefix, len(frames), timeout=20)
        dead = await read_stream(redis_client, f"{key_prefix}:{{l1}}:dead")
    finally:
        await daemon.shutdown()
    assert len(history) == 20 and history[-1] < history[0], history
    assert described["learning"]["per_product"] == "trained" and described["calibration"]["shifted_views"] == 16
    assert not dead and sorted(r["frame_id"] for r in results) == sorted(frames)
    assert {(r["detector"], r["state_version"]) for r in results} == {("promptad", "1")}
    scores = {r["frame_id"]: float(r["score"]) for r in results}
    good = [s for f, s in scores.items() if f.startswith("good")]
    colour = [s for f, s in scores.items() if f.startswith("colour")]
    assert np.mean(colour) > np.mean(good), scores

    def no_fit(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a restart must not retrain")

    monkeypatch.setattr(PromptAd, "fit", no_fit)  # the trained state was saved with the product
    restarted = InspectDaemon(config, backbone=tiny_backbone)
    await restarted.start()
    try:
        again = restarted.registry.get("nut")
    finally:
        await restarted.shutdown()
    assert again.threshold == entry.threshold and again.state.meta["history"] == entry.state.meta["history"]
    assert all(torch.equal(again.state.tensors[k], entry.state.tensors[k]) for k in entry.state.tensors)


@pytest.mark.redis
async def test_a_background_fit_keeps_other_products_scoring_shows_progress_and_is_stopped_by_a_newer_put(
        redis_client, redis_url, key_prefix, tmp_path, refs_dir, tiny_backbone, monkeypatch) -> None:
    slow_step = PromptAd.loss_terms

    def loss_terms(self: PromptAd, *args: Any) -> Any:
        if self.options.steps >= 100:
            time.sleep(0.015)  # a build slow enough to watch and stop on the tiny model
        return slow_step(self, *args)

    monkeypatch.setattr(PromptAd, "loss_terms", loss_terms)
    daemon = InspectDaemon(config_for(redis_url, key_prefix, tmp_path, [product("other", refs_dir, shots=2,
                                                                                steps=5)]), backbone=tiny_backbone)
    await daemon.start()
    image = png_bytes(HAZELNUT / "good" / "30.png")
    sent: dict[str, float] = {}
    producing = True

    async def produce() -> None:
        i = 0
        while producing:
            frame_id = f"o{i:04d}"
            await redis_client.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields("other", "l1", frame_id, image))
            sent[frame_id] = time.time()
            i += 1
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    seen: list[tuple[float, str]] = []
    gauges: list[float] = []
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as http:
            async with http.put("/products/slow?wait=false", json=product("slow", refs_dir, steps=400)) as response:
                assert response.status == 202, await response.text()
            fit_started = time.time()
            deadline = time.monotonic() + 30
            while not seen or seen[-1][0] < 0.25:
                async with http.get("/products/slow") as response:
                    state = await response.json()
                assert state["build"] is not None and time.monotonic() < deadline, state
                seen.append((state["build"]["fraction"], state["build"]["note"]))
                async with http.get("/metrics") as response:
                    gauge = re.search(r'inspectd_product_build_progress\{product="slow"\} (\S+)', await response.text())
                if gauge:
                    gauges.append(float(gauge[1]))
                await asyncio.sleep(0.1)
            fit_seen_until = time.time()
            async with http.put("/products/slow", json=product("slow", refs_dir, steps=4)) as response:
                newer = await response.json()
                assert response.status in (200, 201), newer
        producing = False
        await producer
        results = await wait_for_results(redis_client, key_prefix, len(sent), timeout=20)
        entry = daemon.registry.get("slow")
        builds = daemon.registry.builds
    finally:
        producing = False
        await producer
        await daemon.shutdown()
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and len(set(fractions)) >= 4, seen
    assert any(re.search(r"epoch \d+/400", note) for _, note in seen), seen
    assert gauges == sorted(gauges) and any(0.0 < g < 1.0 for g in gauges), gauges
    # the newer PUT stopped the 400-step fit: the served state is the 4-step one, the first build never swapped in
    assert newer["version"] == 1 and entry.config.options == {"steps": 4} and entry.state.meta["steps_run"] == 4
    assert builds == 2  # "other" and the newer "slow"
    # frames of the other product kept being scored while the fit ran, with bounded latency
    assert sorted(r["frame_id"] for r in results) == sorted(sent)
    latency = {r["frame_id"]: int(r["_id"].split("-")[0]) / 1000 - sent[r["frame_id"]] for r in results}
    during = [lat for f, lat in latency.items() if fit_started <= sent[f] <= fit_seen_until]
    assert len(during) >= 10, during
    print(f"other product's latency during the fit: n={len(during)} median {np.median(during):.3f} s, "
          f"max {max(during):.3f} s")
    assert max(during) < 2.0 and float(np.median(during)) < 0.5, sorted(during)


# ------------------------------------------------------------------------------------------------ eval
def test_eval_cli_runs_promptad_with_shots_seeds_and_compare(tiny_checkpoint: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`inspectd eval --detector promptad --shots .. --seeds .. --compare promptad`, small: MVTec grid (14 test
    images), 2 prompt steps."""
    import json

    assert detector_class("promptad") is PromptAd
    out = tmp_path / "eval"
    args = ["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "--detector", "promptad",
            "--shots", "1", "2", "--seeds", "2", "--compare", "promptad", "--arch", "inspectd-tiny",
            "--weights", str(tiny_checkpoint), "--device", "cpu", "--options", '{"steps": 2}', "--out", str(out),
            "--cache", "", "--eval-size", "128"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "promptad 1-shot on mvtec_ad (2 seed(s))" in printed and "promptad 2-shot on mvtec_ad" in printed
    doc = json.loads((out / "promptad_1shot.json").read_text())
    rows = {(r["category"], r["metric"]): r for r in doc["results"]}
    assert rows[("grid", "image_auroc")]["n_seeds"] == 2 and rows[("grid", "pixel_auroc")]["mean"] is not None
    assert rows[("mean", "image_auroc")]["paper"] == 94.6  # PromptAD's 1-shot MVTec mean beside ours
    assert sorted(p.name for p in out.iterdir()) == sorted(f"promptad_{k}shot.{ext}" for k in (1, 2)
                                                           for ext in ("md", "json", "csv"))


def test_eval_seeds_reach_the_training_seed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`inspectd eval --seeds 2` trains each seed's prompts with that seed, as the daemon trains a product with
    its `seed` (mean ± std over seeds must include the training's own variance; every seed used to train with 0)."""
    import json

    from safetensors import safe_open

    cache = tmp_path / "cache"
    args = ["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "--detector", "promptad",
            "--shots", "1", "--seeds", "2", "--arch", "inspectd-tiny", "--weights", str(tiny_checkpoint),
            "--device", "cpu", "--options", '{"steps": 2}', "--out", str(tmp_path / "eval"), "--cache", str(cache),
            "--eval-size", "64"]
    assert cli_main(args) == 0
    states = sorted((cache / "states").glob("*.safetensors"))
    assert len(states) == 2, states
    seeds = set()
    for path in states:
        with safe_open(str(path), framework="pt") as handle:
            seeds.add(json.loads(handle.metadata()["meta"])["seed"])
    assert seeds == {0, 1}
