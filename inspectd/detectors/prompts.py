"""Prompt ensembles and text prototypes shared by every CLIP detector.

WinCLIP's and APRIL-GAN's compositional prompt ensembles (state words x templates, object name
substituted) and the two-class normal/anomalous softmax score used by several methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

WINCLIP_NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
    "{} without damage",
)
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# APRIL-GAN (VAND 2023 report; lists as in its official prompt_ensemble.py): WinCLIP's states plus
# "broken {}", and ImageNet-style templates with the ones unsuitable for inspection removed.
APRILGAN_NORMAL_STATES = WINCLIP_NORMAL_STATES
APRILGAN_ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
APRILGAN_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)


def defect_states(defect_words: Sequence[str]) -> tuple[str, ...]:
    """Extra anomalous states from task-specific defect words ("{} with <word>"); blank words are skipped.

    A word is text, never a format field: its braces are escaped for `compositional_prompts`.
    """
    words = (" ".join(word.split()) for word in defect_words)
    return tuple(f"{{}} with {word.replace('{', '{{').replace('}', '}}')}" for word in words if word)


def compositional_prompts(states: Sequence[str], templates: Sequence[str], object_name: str) -> list[str]:
    """Every (state, template) combination with the object name filled in."""
    return [template.format(state.format(object_name)) for state in states for template in templates]


def class_prototype(text_embeddings: torch.Tensor) -> torch.Tensor:
    """Mean of L2-normalised prompt embeddings [P, D], re-normalised: [D]."""
    return F.normalize(F.normalize(text_embeddings, dim=-1).mean(dim=0), dim=-1)


def two_class_anomaly_score(embeddings: torch.Tensor, prototypes: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """exp(<e,t_a>/tau) / (exp(<e,t_n>/tau) + exp(<e,t_a>/tau)) for normalised e [..., D].

    ``prototypes`` is [2, D] (normal, anomalous), normalised; tau = 1 / logit_scale.
    """
    logits = logit_scale * (F.normalize(embeddings, dim=-1) @ prototypes.T)
    return torch.softmax(logits, dim=-1)[..., 1]


def text_prototypes(backbone: object, normal_states: Sequence[str], anomalous_states: Sequence[str],
                    templates: Sequence[str], object_name: str) -> torch.Tensor:
    """[2, D] (normal, anomalous) class prototypes of a compositional ensemble for ``object_name``."""
    encode = backbone.encode_text  # type: ignore[attr-defined]
    return torch.stack([
        class_prototype(encode(compositional_prompts(normal_states, templates, object_name))),
        class_prototype(encode(compositional_prompts(anomalous_states, templates, object_name))),
    ])
