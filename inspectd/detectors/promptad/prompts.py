"""PromptAD's prompts: the learnable prompt sets (normal context + learnable anomaly suffixes, semantic
concatenation with the manual anomaly suffixes) and the published suffix lists and class names.

Token layout (CoOp style, as the official ``PromptLearner``; spec §2.3). Placeholder words are tokenised and their
embeddings replaced by learnable vectors, so the end-of-text position stays right:

- normal prompt (NP):       ``[SOS][P1..P_EN] obj .[EOS]``                       N of them
- manual anomaly (MAP):     ``[SOS][P1..P_EN] <suffix.format(obj)> .[EOS]``      N × M (the P are the NP's, shared)
- learnable anomaly (LAP):  ``[SOS][P1..P_EN][A_l] obj .[EOS]``                  N × L (every (n, l) pair)

Choices where the sources disagree (each an option of the detector): the LAP token sits *before* the object
name (the code; third-party summaries put it after); the generic suffixes are the supplement's 5 (the code's
8 with ``generic_suffixes="code"``); N × L LAPs pair every normal context with every anomaly context (the code's
row pairing is the same for N = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inspectd.detectors.prompts import defect_states

GENERIC_SUFFIXES = {
    "paper": ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"),  # supplement Fig. 1
    "code": ("damaged {}", "flawed {}", "abnormal {}", "imperfect {}", "blemished {}", "{} with flaw",
             "{} with defect", "{} with damage"),  # the official code's `state_anomaly`
}

# Object-customised anomaly suffixes, supplement Figure 1, keyed by the datasets' category folder names
# (spelling as published, including "melded", "particals" and fryum's duplicate; duplicates are dropped at use).
MVTEC_SUFFIXES: dict[str, tuple[str, ...]] = {
    "bottle": ("{} with large breakage", "{} with small breakage", "{} with contamination"),
    "toothbrush": ("{} with defect", "{} with anomaly"),
    "carpet": ("{} with hole", "{} with color stain", "{} with metal contamination", "{} with thread residue",
               "{} with thread", "{} with cut"),
    "hazelnut": ("{} with crack", "{} with cut", "{} with hole", "{} with print"),
    "leather": ("{} with color stain", "{} with cut", "{} with fold", "{} with glue", "{} with poke"),
    "cable": ("{} with bent wire", "{} with missing part", "{} with missing wire", "{} with cut", "{} with poke"),
    "capsule": ("{} with crack", "{} with faulty imprint", "{} with poke", "{} with scratch",
                "{} squeezed with compression"),
    "grid": ("{} with breakage", "{} with thread residue", "{} with thread", "{} with metal contamination",
             "{} with glue", "{} with a bent shape"),
    "pill": ("{} with color stain", "{} with contamination", "{} with crack", "{} with faulty imprint",
             "{} with scratch", "{} with abnormal type"),
    "transistor": ("{} with bent lead", "{} with cut lead", "{} with damage", "{} with misplaced transistor"),
    "metal_nut": ("{} with a bent shape", "{} with color stain", "{} with a flipped orientation", "{} with scratch"),
    "screw": ("{} with manipulated front", "{} with scratch neck", "{} with scratch head"),
    "zipper": ("{} with broken teeth", "{} with fabric border", "{} with defect fabric", "{} with broken fabric",
               "{} with split teeth", "{} with squeezed teeth"),
    "tile": ("{} with crack", "{} with glue strip", "{} with gray stroke", "{} with oil", "{} with rough surface"),
    "wood": ("{} with color stain", "{} with hole", "{} with scratch", "{} with liquid"),
}
_PCB = ("{} with bent", "{} with scratch", "{} with missing", "{} with melt")
_MACARONI = ("{} with color spot", "{} with small chip around edge", "{} with small scratches", "{} with breakage",
             "{} with cracks")
VISA_SUFFIXES: dict[str, tuple[str, ...]] = {
    "candle": ("{} with melded wax", "{} with foreign particals", "{} with extra wax", "{} with chunk of wax missing",
               "{} with weird candle wick", "{} with damaged corner of packaging", "{} with different colour spot"),
    "capsules": ("{} with scratch", "{} with discolor", "{} with misshape", "{} with leak", "{} with bubble"),
    "cashew": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
               "{} with spot"),
    "chewinggum": ("{} with corner missing", "{} with scratches", "{} with chunk of gum missing",
                   "{} with colour spot", "{} with cracks"),
    "fryum": ("{} with breakage", "{} with scratches", "{} with burnt", "{} with colour spot",
              "{} with fryum stuck together", "{} with colour spot"),
    "macaroni1": _MACARONI,
    "macaroni2": _MACARONI,
    "pcb1": _PCB,
    "pcb2": _PCB,
    "pcb3": _PCB,
    "pcb4": ("{} with scratch", "{} with extra", "{} with missing", "{} with wrong place", "{} with damage",
             "{} with burnt", "{} with dirt"),
    "pipe_fryum": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
                   "{} with colour spot", "{} with cracks"),
}
PUBLISHED_SUFFIXES: dict[str, tuple[str, ...]] = {**MVTEC_SUFFIXES, **VISA_SUFFIXES}

# The official code's prompt names for categories whose folder name is not the object's name.
CLASS_NAMES = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
               "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
               "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}


def published_key(product: str, object_name: str) -> str | None:
    """The published list a product uses: its id (``inspectd eval`` names products by category), else its object
    name with spaces as underscores ("metal nut" -> metal_nut); None when neither is a published category."""
    for key in (product, object_name.strip().lower().replace(" ", "_")):
        if key in PUBLISHED_SUFFIXES:
            return key
    return None


def prompt_object_name(product: str, object_name: str) -> str:
    """The object name in the prompts: the official mapping for a published category named by its folder
    (eval's default object name "pcb1" -> "printed circuit board"), else the product's own."""
    if product in CLASS_NAMES and object_name in (product, product.replace("_", " ")):
        return CLASS_NAMES[product]
    return object_name


def anomaly_suffixes(product: str, object_name: str, defect_words: Sequence[str], generic: str = "paper",
                     builtin: bool = True) -> tuple[str, ...]:
    """The M manual suffixes: generic ones, the published object-specific list (``builtin``) and one
    "{} with <word>" per product defect word (its braces escaped: a word is text, never a format field; blank
    words skipped, as `prompts.defect_states`); duplicates dropped, order kept."""
    if generic not in GENERIC_SUFFIXES:
        raise ValueError(f"generic_suffixes must be one of {sorted(GENERIC_SUFFIXES)}, not {generic!r}")
    key = published_key(product, object_name) if builtin else None
    states = [*GENERIC_SUFFIXES[generic], *(PUBLISHED_SUFFIXES[key] if key else ()), *defect_states(defect_words)]
    return tuple(dict.fromkeys(s.strip() for s in states))


class PromptSet(nn.Module):
    """One learnable prompt set: ``normal_ctx`` [N, E_N, W] and ``abnormal_ctx`` [L, E_A, W] (initialised
    N(0, 0.02²) from ``generator``), with the fixed token embeddings of its NP/MAP/LAP texts as non-persistent
    buffers (the state dict, hence checkpoints and product states, holds the two parameters only)."""

    def __init__(self, backbone: object, object_name: str, suffixes: Sequence[str], n_prompts: int = 1,
                 n_ctx: int = 4, n_anomaly: int = 4, n_ctx_anomaly: int = 1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if min(n_prompts, n_ctx, n_anomaly, n_ctx_anomaly) < 1 or not suffixes:
            raise ValueError("a prompt set needs N, E_N, L, E_A >= 1 and at least one manual suffix")
        width = int(backbone.model.token_embedding.weight.shape[1])  # type: ignore[attr-defined]
        self.n_prompts, self.n_ctx, self.n_anomaly, self.n_ctx_anomaly = n_prompts, n_ctx, n_anomaly, n_ctx_anomaly
        self.normal_ctx = nn.Parameter(0.02 * torch.randn(n_prompts, n_ctx, width, generator=generator))
        self.abnormal_ctx = nn.Parameter(0.02 * torch.randn(n_anomaly, n_ctx_anomaly, width, generator=generator))
        prefix, learned = " ".join(["N"] * n_ctx), " ".join(["A"] * n_ctx_anomaly)
        self.texts = {
            "normal": [f"{prefix} {object_name}."] * n_prompts,
            "manual": [f"{prefix} {s.format(object_name)}." for s in suffixes for _ in range(n_prompts)],
            "learned": [f"{prefix} {learned} {object_name}."] * (n_prompts * n_anomaly),
        }
        device = self.normal_ctx.device
        for kind, texts in self.texts.items():
            tokens, embeddings = backbone.tokenize(texts)  # type: ignore[attr-defined]
            _check_placeholders(backbone, tokens, n_ctx + (n_ctx_anomaly if kind == "learned" else 0))
            self.register_buffer(f"{kind}_embeddings", embeddings.float().to(device), persistent=False)
            self.register_buffer(f"{kind}_eot", tokens.argmax(dim=-1).to(device), persistent=False)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [P, T, W] of all prompts (normal, manual, learned) with the contexts in, and EOT [P]."""
        n, e_n, e_a = self.n_prompts, self.n_ctx, self.n_ctx_anomaly
        ctx = self.normal_ctx.to(self.normal_embeddings.dtype)
        normal = torch.cat([self.normal_embeddings[:, :1], ctx, self.normal_embeddings[:, 1 + e_n:]], dim=1)
        m = self.manual_embeddings.shape[0] // n
        ctx_m = ctx.unsqueeze(0).expand(m, -1, -1, -1).reshape(m * n, e_n, -1)  # row s*N + i -> context i
        manual = torch.cat([self.manual_embeddings[:, :1], ctx_m, self.manual_embeddings[:, 1 + e_n:]], dim=1)
        ctx_l = ctx.unsqueeze(1).expand(-1, self.n_anomaly, -1, -1).reshape(n * self.n_anomaly, e_n, -1)
        anomaly = self.abnormal_ctx.to(ctx.dtype).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * self.n_anomaly,
                                                                                              e_a, -1)
        learned = torch.cat([self.learned_embeddings[:, :1], ctx_l, anomaly,
                             self.learned_embeddings[:, 1 + e_n + e_a:]], dim=1)  # row i*L + l -> (i, l)
        eot = torch.cat([self.normal_eot, self.manual_eot, self.learned_eot])
        return torch.cat([normal, manual, learned]), eot

    @property
    def counts(self) -> tuple[int, int, int]:
        """(N, N·M, N·L): how the rows of `embeddings` split into normal, manual and learned prompts."""
        return self.normal_eot.shape[0], self.manual_eot.shape[0], self.learned_eot.shape[0]


def _check_placeholders(backbone: object, tokens: torch.Tensor, n: int) -> None:
    """Each placeholder word must be one token right after SOS, or the learnable rows would be misplaced."""
    ids = tokens[:, 1:1 + n]
    expected = backbone.tokenize(["N A"])[0][0, 1:3]  # type: ignore[attr-defined]
    if not bool(torch.isin(ids, expected.to(ids.device)).all()):
        raise ValueError("prompt placeholders did not tokenise to one token each after SOS")


def encode_sets(backbone: object, sets: Sequence[PromptSet]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Text features of every set in one differentiable text-tower pass: per set (normal [N, D], manual [N·M, D],
    learned [N·L, D]), not normalised."""
    parts = [s.embeddings() for s in sets]
    features = backbone.encode_text_embeddings(torch.cat([p[0] for p in parts]),  # type: ignore[attr-defined]
                                               torch.cat([p[1] for p in parts]))
    out, start = [], 0
    for s in sets:
        n, m, learned = s.counts
        chunk = features[start:start + n + m + learned]
        out.append((chunk[:n], chunk[n:n + m], chunk[n + m:]))
        start += n + m + learned
    return out
