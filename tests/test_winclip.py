"""WinCLIP / WinCLIP+: each formula against an independent reference, batching invariance, real images."""

from __future__ import annotations

import glob
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspectd.detectors import prompts as P
from inspectd.detectors.backbone import ClipBackbone, window_coverage
from inspectd.detectors.base import ProductSpec, create_detector
from inspectd.detectors.memory import association_min_distance, harmonic_mean, harmonic_window_to_patch
from inspectd.detectors.pipeline import ScoreItem, run

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAZELNUT = DATA / "hazelnut_toy" / "hazelnut"
GRID = DATA / "mvtec_ad" / "grid"


def load_rgb(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------- formulas
def test_harmonic_window_to_patch_matches_per_pixel_definition() -> None:
    gh, gw, k = 5, 6, 3
    rng = np.random.default_rng(0)
    window_scores = rng.uniform(0.05, 1.0, size=(2, (gh - k + 1) * (gw - k + 1)))
    expected = np.zeros((2, gh * gw))
    for n in range(2):
        for py, px in itertools.product(range(gh), range(gw)):
            covering = [
                window_scores[n, top * (gw - k + 1) + left]
                for top in range(gh - k + 1) for left in range(gw - k + 1)
                if top <= py < top + k and left <= px < left + k
            ]
            expected[n, py * gw + px] = len(covering) / sum(1.0 / s for s in covering)
    got = harmonic_window_to_patch(torch.tensor(window_scores), window_coverage(gh, gw, k).double(), 1e-6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_harmonic_mean_and_epsilon_clamp() -> None:
    a, b = torch.tensor([0.5, 0.0]), torch.tensor([0.25, 0.5])
    got = harmonic_mean([a, b], eps=1e-3)
    assert got[0].item() == pytest.approx(2 / (1 / 0.5 + 1 / 0.25))
    assert got[1].item() == pytest.approx(2 / (1 / 1e-3 + 1 / 0.5))


def test_association_min_distance_matches_loop() -> None:
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(3, 7, 16))
    memory = rng.normal(size=(40, 16))
    qn = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    mn = memory / np.linalg.norm(memory, axis=-1, keepdims=True)
    expected = np.empty((3, 7))
    for i, j in itertools.product(range(3), range(7)):
        expected[i, j] = min(0.5 * (1 - float(qn[i, j] @ r)) for r in mn)
    got = association_min_distance(torch.tensor(queries), torch.tensor(memory))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_two_class_score_is_the_spec_softmax() -> None:
    rng = np.random.default_rng(2)
    e = rng.normal(size=(4, 8))
    t = rng.normal(size=(2, 8))
    en = e / np.linalg.norm(e, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    tau = 0.01
    expected = np.exp(en @ tn[1] / tau) / (np.exp(en @ tn[0] / tau) + np.exp(en @ tn[1] / tau))
    got = P.two_class_anomaly_score(torch.tensor(e), torch.tensor(tn), 1 / tau)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_prompt_ensemble_counts_and_object_name() -> None:
    prompts = P.compositional_prompts(P.WINCLIP_NORMAL_STATES, P.WINCLIP_TEMPLATES, "hazelnut")
    assert len(prompts) == 7 * 22
    assert "a photo of the flawless hazelnut for visual inspection." in prompts
    extra = P.defect_states(["crack"])
    assert P.compositional_prompts(extra, P.WINCLIP_TEMPLATES[:1], "nut") == ["a cropped photo of the nut with crack."]


def test_score_composes_zero_and_few_shot_as_specified(tiny_backbone: ClipBackbone) -> None:
    """Recompute WinCLIP+ from the raw taps, independently of the detector's own helpers."""
    det = create_detector("winclip", tiny_backbone)
    refs = [load_rgb(p) for p in sorted(glob.glob(str(HAZELNUT / "good" / "*.png")))[:2]]
    state = det.fit(ProductSpec("nut", "hazelnut"), refs)
    image = load_rgb(HAZELNUT / "colour" / "00.png")
    tiles, _ = tiny_backbone.preprocessor(image)
    feats = tiny_backbone.forward(tiles, det.feature_request(state))
    out = det.score(feats, state)

    tn, ta = state.tensors["text_prototypes"]
    scale = tiny_backbone.logit_scale

    def ascore(e: torch.Tensor) -> torch.Tensor:
        e = e / e.norm(dim=-1, keepdim=True)
        return torch.sigmoid(scale * (e @ ta - e @ tn))  # == two-class softmax

    gh, gw = tiny_backbone.grid
    s_img = ascore(feats.image_embeddings)[0]

    def window_map(values: torch.Tensor, k: int) -> torch.Tensor:
        grid = torch.zeros(gh, gw, dtype=torch.float64)
        count = torch.zeros(gh, gw, dtype=torch.float64)
        for u, (top, left) in enumerate(itertools.product(range(gh - k + 1), range(gw - k + 1))):
            grid[top:top + k, left:left + k] += 1.0 / values[u].double().clamp_min(1e-6)
            count[top:top + k, left:left + k] += 1
        return count / grid

    zs = [window_map(ascore(feats.windows[k][0]), k) for k in (2, 3)]
    zero_shot = 3.0 / (1 / zs[0] + 1 / zs[1] + 1 / s_img.double().clamp_min(1e-6))

    def min_dist(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        q = q / q.norm(dim=-1, keepdim=True)
        return torch.stack([(0.5 * (1 - bank @ v)).min() for v in q])

    m_patch = min_dist(feats.patch_tokens[0], state.tensors["memory_patch"]).reshape(gh, gw).double()
    m_small = window_map(min_dist(feats.windows[2][0], state.tensors["memory_window_2"]), 2)
    m_mid = window_map(min_dist(feats.windows[3][0], state.tensors["memory_window_3"]), 3)
    visual = (m_patch + m_small + m_mid) / 3
    fused = 0.5 * zero_shot + 0.5 * visual
    expected_score = 0.5 * (s_img.double() + visual.max())
    assert out.scores[0].item() == pytest.approx(expected_score.item(), abs=1e-5)
    expected_map = torch.nn.functional.interpolate(fused[None, None].float(), size=(240, 240), mode="bilinear",
                                                   align_corners=False)[0, 0]
    torch.testing.assert_close(out.maps[0], expected_map, atol=1e-5, rtol=1e-4)


def test_state_round_trips_through_safetensors(tiny_backbone: ClipBackbone, tmp_path: Path) -> None:
    det = create_detector("winclip", tiny_backbone)
    state = det.fit(ProductSpec("nut", "hazelnut", ("crack",)), [load_rgb(HAZELNUT / "good" / "01.png")])
    det.save_state(state, tmp_path / "state.safetensors")
    loaded, artifact = det.load_state(tmp_path / "state.safetensors")
    assert loaded.meta == state.meta and loaded.detector == "winclip"
    assert artifact.kind == "product_state" and artifact.detector_version == det.version
    assert artifact.backbone == tiny_backbone.identity
    for key, tensor in state.tensors.items():
        torch.testing.assert_close(loaded.tensors[key], tensor)
    assert b"pickle" not in (tmp_path / "state.safetensors").read_bytes()[:200]


def test_unknown_option_names_the_key(tiny_backbone: ClipBackbone) -> None:
    with pytest.raises(ValueError, match="window_size"):
        create_detector("winclip", tiny_backbone, {"window_size": 2})
    with pytest.raises(ValueError, match="language_weight"):
        create_detector("winclip", tiny_backbone, {"language_weight": "half"})


# ----------------------------------------------------------------------------- batching
def test_batched_equals_one_by_one_with_two_products(tiny_backbone: ClipBackbone) -> None:
    det = create_detector("winclip", tiny_backbone)
    nut = det.fit(ProductSpec("nut", "hazelnut"), [load_rgb(HAZELNUT / "good" / "02.png")])
    grid = det.fit(ProductSpec("grid", "grid"), [])
    frames = [
        (nut, load_rgb(HAZELNUT / "colour" / "01.png")),
        (grid, load_rgb(GRID / "test" / "bent" / "000.png")),
        (nut, load_rgb(HAZELNUT / "good" / "20.png")),
        (grid, load_rgb(GRID / "test" / "good" / "000.png")),
        (nut, np.ascontiguousarray(load_rgb(HAZELNUT / "good" / "21.png")[:, :300])),  # non-square: tiles
    ]
    singles = [run([ScoreItem(det, state, image)])[0] for state, image in frames]
    batched = run([ScoreItem(det, state, image) for state, image in frames])
    again = run([ScoreItem(det, state, image) for state, image in frames])
    for one, many, repeat in zip(singles, batched, again, strict=True):
        assert one.score == pytest.approx(many.score, abs=1e-6)
        np.testing.assert_allclose(one.map, many.map, atol=1e-6)
        assert repeat.score == many.score
        np.testing.assert_array_equal(repeat.map, many.map)
    assert batched[4].map.shape == (512, 300)
    assert batched[1].map.shape == (1024, 1024)


# ----------------------------------------------------------------------------- real images
def _auroc(labels: list[int], scores: list[float] | np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _evaluate(backbone: ClipBackbone, spec: ProductSpec, refs: list[str], tests: list[tuple[str, str | None]],
              shots: int) -> tuple[float, float]:
    det = create_detector("winclip", backbone)
    state = det.fit(spec, [load_rgb(p) for p in refs[:shots]])
    outputs = run([ScoreItem(det, state, load_rgb(p), map_size=(128, 128)) for p, _ in tests])
    labels = [0 if m is None else 1 for _, m in tests]
    pixel_scores, pixel_labels = [], []
    for (_, mask_path), out in zip(tests, outputs, strict=True):
        if mask_path is None:
            mask = np.zeros((128, 128), bool)
        else:
            mask = np.asarray(Image.open(mask_path).convert("L").resize((128, 128), Image.NEAREST)) > 0
        pixel_scores.append(out.map.ravel())
        pixel_labels.append(mask.ravel())
    return _auroc(labels, [o.score for o in outputs]), _auroc(np.concatenate(pixel_labels),
                                                             np.concatenate(pixel_scores))


def test_few_shot_ranks_real_hazelnut_defects(tiny_backbone: ClipBackbone) -> None:
    goods = sorted(glob.glob(str(HAZELNUT / "good" / "*.png")))
    bads = sorted(glob.glob(str(HAZELNUT / "colour" / "*.png")))
    tests = [(p, None) for p in goods[4:]] + [(p, p.replace("/colour/", "/mask/colour/")) for p in bads]
    image_auroc, pixel_auroc = _evaluate(tiny_backbone, ProductSpec("nut", "hazelnut"), goods, tests, shots=4)
    # measured with the seed-0 tiny model: image 1.00, pixel 0.83 (random weights, k = 4)
    assert image_auroc >= 0.95
    assert pixel_auroc >= 0.75


def test_few_shot_on_real_mvtec_grid_runs_and_reports(tiny_backbone: ClipBackbone) -> None:
    refs = sorted(glob.glob(str(GRID / "train" / "good" / "*.png")))
    tests = []
    for path in sorted(glob.glob(str(GRID / "test" / "*" / "*.png"))):
        mask = None if "/good/" in path else path.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
        tests.append((path, mask))
    image_auroc, pixel_auroc = _evaluate(tiny_backbone, ProductSpec("grid", "grid"), refs, tests, shots=4)
    # Grid's defects are thin-wire deformations that fall below one 16-px patch once the 1024-px image
    # is resized to 240; a 2-block random-weight ViT does not resolve them (measured: image 0.39,
    # pixel 0.53; 3 good vs 11 defective test images). The floor here checks only that the path
    # produces finite, non-degenerate rankings; real weights are needed for grid accuracy.
    assert 0.0 < image_auroc < 1.0
    assert 0.45 <= pixel_auroc <= 1.0


def test_crop_views_geometry() -> None:
    from inspectd.detectors.preprocess import crop_views

    tile = torch.arange(10 * 10, dtype=torch.float32).reshape(1, 1, 10, 10).expand(1, 3, 10, 10)
    views = crop_views(tile, 5, scale=1.0)  # scale 1: every view is the tile itself
    assert views.shape == (5, 3, 10, 10)
    torch.testing.assert_close(views, tile.expand(5, 3, 10, 10))
    with pytest.raises(ValueError):
        crop_views(tile, 6)


def test_multi_crop_changes_the_image_score_not_the_map(tiny_backbone: ClipBackbone) -> None:
    image = load_rgb(HAZELNUT / "colour" / "03.png")
    plain = create_detector("winclip", tiny_backbone)
    tta = create_detector("winclip", tiny_backbone, {"multi_crop": 3})
    state = plain.fit(ProductSpec("nut", "hazelnut"), [load_rgb(HAZELNUT / "good" / "04.png")])
    [a] = run([ScoreItem(plain, state, image)])
    [b] = run([ScoreItem(tta, state, image)])
    np.testing.assert_allclose(a.map, b.map, atol=1e-6)
    assert a.score != pytest.approx(b.score, abs=1e-7)
