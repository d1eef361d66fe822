"""Shared training losses against hand-written NumPy / loop references: focal, dice, BCE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inspectd.detectors.training.losses import binary_cross_entropy_with_logits, dice_loss, focal_loss, two_class


def random_probs(n: int, c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n, h, w), generator=g)
    return logits, logits.softmax(dim=1), target


def focal_reference(probs: np.ndarray, target: np.ndarray, gamma: float, alpha: list[float] | None,
                    smooth: float) -> float:
    """Element by element, as the released AnomalyCLIP/APRIL-GAN FocalLoss computes it."""
    n, c, h, w = probs.shape
    losses = []
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                p_t = 0.0
                for k in range(c):
                    q = 1.0 if k == t else 0.0
                    if smooth:
                        q = min(max(q, smooth / (c - 1)), 1.0 - smooth)
                    p_t += q * probs[i, k, y, x]
                p_t += smooth
                a = 1.0 if alpha is None else alpha[t]
                losses.append(-a * (1.0 - p_t) ** gamma * math.log(p_t))
    return float(np.mean(losses))


def dice_reference(prob: np.ndarray, target: np.ndarray, smooth: float) -> float:
    per_sample = []
    for p, t in zip(prob, target, strict=True):
        inter = sum(float(a) * float(b) for a, b in zip(p.ravel(), t.ravel(), strict=True))
        per_sample.append(1.0 - (2 * inter + smooth) / (float(p.sum()) + float(t.sum()) + smooth))
    return float(np.mean(per_sample))


# ----------------------------------------------------------------------------- focal
@pytest.mark.parametrize(("c", "gamma", "alpha", "smooth"), [
    (2, 2.0, None, 1e-5), (2, 2.0, None, 0.0), (2, 0.5, [0.25, 0.75], 1e-5), (3, 2.0, None, 1e-5),
    (3, 1.0, [1.0, 2.0, 0.5], 0.0),
])
def test_focal_matches_the_elementwise_reference(c: int, gamma: float, alpha: list[float] | None,
                                                 smooth: float) -> None:
    _, probs, target = random_probs(2, c, 5, 4, seed=c)
    got = focal_loss(probs, target, gamma=gamma, alpha=alpha, smooth=smooth)
    want = focal_reference(probs.numpy(), target.numpy(), gamma, alpha, smooth)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_focal_with_gamma_zero_and_no_smoothing_is_cross_entropy() -> None:
    logits, probs, target = random_probs(3, 2, 6, 6)
    got = focal_loss(probs, target, gamma=0.0, smooth=0.0)
    torch.testing.assert_close(got, F.cross_entropy(logits, target))
    # the released default smoothing (1e-5) moves it only slightly (most where p_t is tiny)
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(got.item(), rel=1e-2)


def test_focal_float_alpha_weights_the_anomalous_class_and_float_masks_are_accepted() -> None:
    _, probs, target = random_probs(2, 2, 4, 4, seed=3)
    got = focal_loss(probs, target.float().unsqueeze(1), alpha=0.25)  # [N, 1, H, W] float mask
    want = focal_reference(probs.numpy(), target.numpy(), 2.0, [0.75, 0.25], 1e-5)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_focal_down_weights_easy_pixels_and_is_near_zero_when_perfect() -> None:
    target = torch.tensor([[[0, 1], [1, 0]]])
    perfect = F.one_hot(target, 2).movedim(-1, 1).double()
    assert focal_loss(perfect, target, smooth=0.0).item() == 0.0
    assert focal_loss(perfect, target).item() < 1e-9  # smoothing keeps it finite, not exactly 0
    confident = two_class(torch.tensor([[[0.1, 0.9], [0.9, 0.1]]], dtype=torch.float64))
    assert focal_loss(confident, target, smooth=0.0) < focal_loss(confident, target, gamma=0.0, smooth=0.0)


def test_focal_on_two_class_anomaly_map_and_reductions() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.rand(2, 3, 3, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 3, 3, generator=g) > 0.5).long()
    per_pixel = focal_loss(two_class(p), mask, reduction="none")
    assert per_pixel.shape == (2, 3, 3)
    p_t = torch.where(mask == 1, p, 1 - p) + 0.0  # smooth=0 reference, Lin et al.
    torch.testing.assert_close(focal_loss(two_class(p), mask, smooth=0.0, reduction="none"),
                               -(1 - p_t) ** 2 * p_t.log())
    torch.testing.assert_close(focal_loss(two_class(p), mask, reduction="sum"), per_pixel.sum())


def test_focal_rejects_bad_inputs() -> None:
    _, probs, target = random_probs(1, 2, 3, 3)
    with pytest.raises(ValueError, match="binarise"):
        focal_loss(probs, target.float() * 0.7)
    with pytest.raises(ValueError, match=r"classes must be in \[0, 1\]"):
        focal_loss(probs, target + 1)
    with pytest.raises(ValueError, match="does not match"):
        focal_loss(probs, target[:, :2])
    with pytest.raises(ValueError, match="two_class"):
        focal_loss(probs[:, :1], target)
    with pytest.raises(ValueError, match="class weights"):
        focal_loss(probs, target, alpha=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(probs, target, reduction="avg")  # type: ignore[arg-type]


def test_focal_has_gradients() -> None:
    logits, _, target = random_probs(1, 2, 4, 4)
    logits.requires_grad_(True)
    focal_loss(logits.softmax(1), target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- dice
def test_dice_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(3, 5, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 5, 7, generator=g) > 0.7).double()
    for smooth in (1.0, 0.0, 1e-3):
        got = dice_loss(prob, mask, smooth=smooth)
        assert got.item() == pytest.approx(dice_reference(prob.numpy(), mask.numpy(), smooth), rel=1e-12)
    torch.testing.assert_close(dice_loss(prob, mask.unsqueeze(1)), dice_loss(prob, mask))  # [N, 1, H, W] mask
    per = dice_loss(prob, mask, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), dice_loss(prob, mask))


def test_dice_edge_cases() -> None:
    mask = torch.zeros(2, 4, 4)
    mask[0, 1:3, 1:3] = 1
    assert dice_loss(mask.clone(), mask).item() == 0.0  # perfect prediction (one sample with an empty mask)
    empty = torch.zeros(1, 4, 4)
    assert dice_loss(empty, empty).item() == 0.0  # empty mask, empty prediction: smoothing avoids 0/0
    assert dice_loss(torch.ones(1, 4, 4), empty).item() == pytest.approx(1 - 1 / 17)  # false alarm everywhere
    assert dice_loss(empty, torch.ones(1, 4, 4)).item() == pytest.approx(1 - 1 / 17)  # missed everything
    with pytest.raises(ValueError, match="does not match"):
        dice_loss(torch.ones(1, 4, 4), torch.ones(1, 4, 5))


# ----------------------------------------------------------------------------- BCE
def test_bce_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g, dtype=torch.float64) * 5
    targets = (torch.rand(50, generator=g) > 0.5).long()  # integer labels are cast
    sig = 1 / (1 + np.exp(-logits.numpy()))
    y = targets.numpy()
    want = -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
    assert binary_cross_entropy_with_logits(logits, targets).item() == pytest.approx(want.mean(), rel=1e-10)
    np.testing.assert_allclose(binary_cross_entropy_with_logits(logits, targets, reduction="none").numpy(), want,
                               rtol=1e-10)
    pos_weight = torch.tensor(3.0, dtype=torch.float64)
    weighted = -(3.0 * y * np.log(sig) + (1 - y) * np.log(1 - sig))
    assert binary_cross_entropy_with_logits(logits, targets, pos_weight).item() == pytest.approx(weighted.mean())
    assert math.isfinite(binary_cross_entropy_with_logits(torch.tensor([1e4]), torch.tensor([0.0])).item())
    with pytest.raises(ValueError, match="differ"):
        binary_cross_entropy_with_logits(logits, targets[:, None])
