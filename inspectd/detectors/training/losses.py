"""Training losses shared by the learned detectors: dense focal and dice losses (APRIL-GAN, AnoPLe) and BCE (randword).

Conventions, chosen to match the released APRIL-GAN / AnomalyCLIP code (``FocalLoss`` and ``BinaryDiceLoss``):

- ``focal_loss`` takes per-pixel class *probabilities* ``[N, C, *spatial]`` (a softmax over the C classes, e.g.
  C = 2 for {normal, anomalous}) and an integer class map ``[N, *spatial]``. APRIL-GAN feeds its 2-channel
  softmax map directly; a method that only has the anomaly probability ``p`` (AnoPLe's ``M̂[..., 1]``) passes
  ``two_class(p)``, i.e. channels ``[1 - p, p]``.
- ``dice_loss`` takes the anomaly-class probability ``[N, *spatial]`` and a (binary or soft) mask of the same shape.

Both accept a singleton channel axis on the target (``[N, 1, H, W]`` masks, as data loaders often produce).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _drop_channel_axis(target: torch.Tensor, want_dim: int) -> torch.Tensor:
    """``[N, 1, *spatial]`` -> ``[N, *spatial]`` when the caller expects ``want_dim`` dimensions."""
    if target.dim() == want_dim + 1 and target.shape[1] == 1:
        return target.squeeze(1)
    return target


def two_class(prob: torch.Tensor) -> torch.Tensor:
    """Anomaly probabilities ``[N, *spatial]`` -> 2-class probabilities ``[N, 2, *spatial]`` = ``[1 - p, p]``."""
    return torch.stack([1.0 - prob, prob], dim=1)


def _class_weights(alpha: float | Sequence[float] | None, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    if alpha is None:
        return torch.ones(num_classes, dtype=like.dtype, device=like.device)
    if isinstance(alpha, int | float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal alpha must be in [0, 1], got {alpha}")
        weights = torch.full((num_classes,), 1.0 - float(alpha), dtype=like.dtype, device=like.device)
        weights[1] = float(alpha)
        return weights
    weights = torch.as_tensor(list(alpha), dtype=like.dtype, device=like.device)
    if weights.shape != (num_classes,):
        raise ValueError(f"focal alpha has {weights.numel()} class weights but the input has {num_classes} classes")
    return weights


def _class_index(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer class map; a float/bool mask must already hold whole class numbers (binarise soft masks first)."""
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise ValueError("focal_loss target holds non-integer values; binarise the mask first (e.g. mask > 0.5)")
    index = target.long()
    if index.numel() and (index.min() < 0 or index.max() >= num_classes):
        raise ValueError(f"focal_loss target classes must be in [0, {num_classes - 1}], "
                         f"got [{int(index.min())}, {int(index.max())}]")
    return index


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | Sequence[float] | None = None, smooth: float = 1e-5,
               reduction: Reduction = "mean") -> torch.Tensor:
    """Focal loss (Lin et al.) on class probabilities, as APRIL-GAN / AnomalyCLIP's ``FocalLoss``.

    ``probs``: ``[N, C, *spatial]`` probabilities (softmax over C; not logits). ``target``: ``[N, *spatial]``
    (or ``[N, 1, *spatial]``) class indices in ``[0, C)``; float masks must hold exactly 0/1/...

    Per element with true class ``t``::

        q_c   = clamp(onehot_c(t), smooth / (C - 1), 1 - smooth)     # label smoothing of the one-hot target
        p_t   = sum_c q_c * probs_c + smooth
        loss  = -alpha_t * (1 - p_t) ** gamma * log(p_t)

    With ``smooth = 0`` this is the textbook ``-alpha_t (1 - p_t)^gamma log p_t``; with ``gamma = 0`` as well it is
    the cross-entropy ``-log p_t`` (= ``F.cross_entropy`` on the logits behind ``probs``). ``alpha``: None = 1 for
    every class (the released code's default); a float = Lin et al.'s alpha for class 1 (anomalous) and
    ``1 - alpha`` for every other class; a sequence = one weight per class, used as given. ``reduction="mean"``
    averages over every element of every sample (the released ``size_average=True``).
    """
    if probs.dim() < 2:
        raise ValueError(f"focal_loss needs probabilities [N, C, ...], got shape {tuple(probs.shape)}")
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError("focal_loss needs C >= 2 class probabilities; pass two_class(p) for an anomaly map p")
    target = _drop_channel_axis(target, probs.dim() - 1)
    expected = (probs.shape[0], *probs.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"focal_loss target shape {tuple(target.shape)} does not match probabilities "
                         f"{tuple(probs.shape)} (expected {expected})")
    index = _class_index(target, num_classes)
    onehot = F.one_hot(index, num_classes).movedim(-1, 1).to(probs.dtype)  # [N, C, *spatial]
    if smooth:
        onehot = onehot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    p_t = (onehot * probs).sum(dim=1) + smooth
    log_p_t = p_t.clamp_min(torch.finfo(p_t.dtype).tiny).log()
    alpha_t = _class_weights(alpha, num_classes, probs)[index]
    loss = -alpha_t * (1.0 - p_t).pow(gamma) * log_p_t
    return _reduce(loss, reduction)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
              reduction: Reduction = "mean") -> torch.Tensor:
    """Soft dice loss per sample, as APRIL-GAN / AnomalyCLIP's ``BinaryDiceLoss``.

    ``prob``: ``[N, *spatial]`` anomaly-class probabilities; ``target``: the mask, same shape (or with a singleton
    channel axis), values in [0, 1]. Per sample ``n`` over all its pixels::

        loss_n = 1 - (2 * sum(prob * target) + smooth) / (sum(prob) + sum(target) + smooth)

    ``smooth`` keeps an empty mask with an all-zero prediction at loss 0 (instead of 0/0); a perfect prediction
    gives 0 for any mask. ``reduction="mean"`` averages ``loss_n`` over the batch (``1 - sum(dice) / N``).
    """
    if prob.dim() < 1 or prob.shape[0] == 0:
        raise ValueError(f"dice_loss needs a batch [N, ...] with N >= 1, got shape {tuple(prob.shape)}")
    if smooth < 0:
        raise ValueError(f"dice smooth must be >= 0, got {smooth}")
    target = _drop_channel_axis(target, prob.dim())
    if target.shape != prob.shape:
        raise ValueError(f"dice_loss target shape {tuple(target.shape)} does not match prob {tuple(prob.shape)}")
    p = prob.reshape(prob.shape[0], -1)
    t = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * t).sum(dim=1) + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)
    return _reduce(1.0 - dice, reduction)


def binary_cross_entropy_with_logits(logits: torch.Tensor, targets: torch.Tensor,
                                     pos_weight: torch.Tensor | None = None,
                                     reduction: Reduction = "mean") -> torch.Tensor:
    """``-[y log σ(x) + (1 - y) log(1 - σ(x))]`` on raw logits (numerically stable), shapes must match exactly.

    A thin wrapper over ``F.binary_cross_entropy_with_logits`` (the random-word FFN's loss) that casts the
    targets to the logits' dtype and refuses broadcasting between different shapes.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"BCE logits shape {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=pos_weight,
                                              reduction=reduction)
