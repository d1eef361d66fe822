"""AnoPLe's maps and loss terms (spec §2.7-2.8): pixel (dice + focal), the two image CE terms, global-local alignment.

Conventions: ``text`` [N, 2, D] holds each row's normalised (w⁺, w⁻); ``scale`` is the CE/pixel temperature 1/τ
(CLIP's logit scale, pitfall 7); index 1 is "abnormal" everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inspectd.detectors.training.losses import dice_loss, focal_loss, two_class


def image_logits(embeddings: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """[N, 2]: scale · cos(z⁰, w^±) for image embeddings [N, D]."""
    return scale * torch.einsum("nd,ncd->nc", F.normalize(embeddings, dim=-1), text)


def pixel_logits(dense: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """[N, 2, h, w]: scale · cos(D_ij(z), w^±) for decoder features [N, D, h, w]."""
    return scale * torch.einsum("ndhw,ncd->nchw", F.normalize(dense, dim=1), text)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[N, h, w] -> [N, size, size], bilinear."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def pixel_loss(prob: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """L_pixel = dice(M̂, M) + focal(M̂, M) on the abnormal probability [N, H, W] and a binary mask [N, H, W]."""
    return dice_loss(prob, mask.float()) + focal_loss(two_class(prob), mask.long(), gamma=gamma)


def image_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ce over views: normal views label 0 (+), pseudo-abnormal views with anomalous pixels label 1 (−)."""
    return F.cross_entropy(logits, labels)


def latent_loss(embeddings: torch.Tensor, text: torch.Tensor, noise: torch.Tensor, scale: float,
                smoothing: float = 0.003) -> torch.Tensor:
    """L_ce of latent anomalies z⁻ = normalize(z⁺) + ε (label −, label smoothing) for normal embeddings [N, D]."""
    noisy = F.normalize(embeddings, dim=-1) + noise
    labels = torch.ones(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
    return F.cross_entropy(image_logits(noisy, text, scale), labels, label_smoothing=smoothing)


def alignment_loss(embeddings: torch.Tensor, dense: torch.Tensor, abnormal_logits: torch.Tensor,
                   tau: float = 2.0) -> torch.Tensor:
    """L_align = mean over rows of 1 − cos(z⁰, s), s = Σ_ij softmax_ij(abnormal logit / τ) · D_ij(z).

    The softmax runs over spatial positions (the "weighted sum" reading, pitfall 15) of the abnormal channel of
    `pixel_logits`; s is not detached (the paper does not say it is).
    """
    weights = torch.softmax(abnormal_logits.flatten(1) / tau, dim=1)  # [N, h*w]
    pooled = torch.einsum("nl,ndl->nd", weights, dense.flatten(2))
    return (1.0 - F.cosine_similarity(embeddings, pooled, dim=-1)).mean()


@dataclass
class Terms:
    pixel: torch.Tensor
    image: torch.Tensor
    latent: torch.Tensor
    align: torch.Tensor

    def total(self) -> torch.Tensor:
        """L = L_pixel + L_img (both CE terms) + L_align, equal weights (spec §2.8)."""
        return self.pixel + self.image + self.latent + self.align

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("pixel", "image", "latent", "align")}
