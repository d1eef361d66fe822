"""PromptAD's training losses (spec §2.4-2.5, as the official ``train_cls.py``/``train_seg.py``): text prototypes,
the one-class contrastive loss, the explicit anomaly margin (EAM) and the MAP-LAP alignment.

``f`` are L2-normalised visual features [B, D] (CLS) or [B, L, D] (V-V patches); text features come un-normalised
from the text tower. EAM on patches is a per-patch hinge (the official seg run sums its squared distances over
the patch axis instead, spec pitfall 7; the per-patch form is the evident intent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def prototypes(normal: torch.Tensor, manual: torch.Tensor, learned: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n̄ [D], ā [D], a [K, D]): normalised means of the *un-normalised* normal / all anomaly features, and
    each anomaly prompt normalised (K = N·(M + L))."""
    anomaly = torch.cat([manual, learned])
    return (F.normalize(normal.mean(dim=0), dim=-1), F.normalize(anomaly.mean(dim=0), dim=-1),
            F.normalize(anomaly, dim=-1))


def contrastive_loss(f: torch.Tensor, normal_proto: torch.Tensor, anomalies: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """CE over ``scale · [<f, n̄>, <f, a_1>, ..., <f, a_K>]`` with target 0, mean over every feature row."""
    logits = scale * torch.cat([(f @ normal_proto)[..., None], f @ anomalies.T], dim=-1)
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device))


def margin_loss(f: torch.Tensor, normal_proto: torch.Tensor, anomaly_proto: torch.Tensor, margin: float = 0.0
                ) -> torch.Tensor:
    """EAM: mean of max(0, ||f − n̄||² − ||f − ā||² + r) over every feature row (r = 0 in the released code)."""
    to_normal = (f - normal_proto).pow(2).sum(dim=-1)
    to_anomaly = (f - anomaly_proto).pow(2).sum(dim=-1)
    return F.relu(to_normal - to_anomaly + margin).mean()


def alignment_loss(manual: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """||mean_m normalize(t^MAP_m) − mean_l normalize(t^LAP_l)||²₂."""
    return (F.normalize(manual, dim=-1).mean(dim=0) - F.normalize(learned, dim=-1).mean(dim=0)).pow(2).sum()


@dataclass
class LossTerms:
    contrastive: torch.Tensor
    margin: torch.Tensor
    alignment: torch.Tensor

    def total(self, align_weight: float) -> torch.Tensor:
        """L = L_ce + L_eam + λ · L_align."""
        return self.contrastive + self.margin + align_weight * self.alignment


def promptad_terms(f: torch.Tensor, normal: torch.Tensor, manual: torch.Tensor, learned: torch.Tensor,
                   scale: float, margin: float = 0.0) -> LossTerms:
    """The three terms for visual features ``f`` and one prompt set's text features."""
    normal_proto, anomaly_proto, anomalies = prototypes(normal, manual, learned)
    return LossTerms(contrastive_loss(f, normal_proto, anomalies, scale),
                     margin_loss(f, normal_proto, anomaly_proto, margin), alignment_loss(manual, learned))
