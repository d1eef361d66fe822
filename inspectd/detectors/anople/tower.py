"""AnoPLe's prompted image tower ("anople"): the view token and deep visual prompts prepended before the CLS token.

Input-layer sequence per row (spec §2.6): ``[c_i, P₀ᵛ (C_v), f_{t→v}(P₀ᵗ) (C_t), CLS, patches]``, so the CLS sits
at index ``1 + C_v + C_t`` and is pooled there (pitfall 11). Prompts enter after patch embedding, positions and
``ln_pre`` and carry no positional embedding (as the shared ``visual_prompts`` tower). At the input of each layer
0 < j < J the C_v + C_t prompt slots are replaced by that layer's set; the view token is inserted at the input
only and propagates (the paper shows its attention at layer 3 but never says it is re-inserted); given per layer
(``anople_view`` [N, J, W], the ``view_token_every_layer`` option) it is re-inserted like the prompts. Patch taps
and ``patch_tokens`` exclude the prefix. Row inputs (per row, so products with different prompts share a
forward): ``anople_prompts`` [N, J, C_v + C_t, W] and ``anople_view`` [N, W] or [N, J, W].

Rows of one forward must share that layout, so a detector asks for the tower by a layout name (`layout_tower`:
"anople/J9/P6", registered on first use, the same forward): products of different layouts get separate forwards
(the pipeline groups by tower) instead of failing to batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features, register_tower

TOWER = "anople"
PROMPTS = "anople_prompts"
VIEW = "anople_view"


def anople_forward(backbone: ClipBackbone, pixels: torch.Tensor, request: FeatureRequest,
                   row_inputs: Mapping[str, torch.Tensor]) -> Features:
    """The prompted forward of [N, 3, S, S]; differentiable in the row inputs when called outside inference mode."""
    if request.windows:
        raise ValueError(f"tower {TOWER!r} does not compute window embeddings")
    if PROMPTS not in row_inputs or VIEW not in row_inputs:
        raise ValueError(f"tower {TOWER!r} needs row_inputs {PROMPTS!r} [N, J, P, W] and {VIEW!r} [N, W]")
    tokens = backbone._embed_tokens(pixels)
    prompts = row_inputs[PROMPTS].to(device=tokens.device, dtype=tokens.dtype)
    view = row_inputs[VIEW].to(device=tokens.device, dtype=tokens.dtype)
    view = view[:, :, None] if view.dim() == 3 else view[:, None, None]  # [N, J or 1, 1, W]
    depth, n_prompts = prompts.shape[1], prompts.shape[2]
    cls_index = 1 + n_prompts
    x = torch.cat([view[:, 0], prompts[:, 0], tokens], dim=1)
    training = torch.is_grad_enabled()  # the fused CPU kernels are inference-only
    taps: dict[int, torch.Tensor] = {}
    for i, block in enumerate(backbone.visual.transformer.resblocks):
        if 0 < i < depth:
            first = view[:, i] if i < view.shape[1] else x[:, :1]
            x = torch.cat([first, prompts[:, i], x[:, cls_index:]], dim=1)
        x = block(x) if training else backbone._block(i, x)
        if i in request.blocks:
            taps[i] = x[:, cls_index + 1:].float()
    return backbone._outputs(x[:, cls_index:], backbone.input_grid(pixels), taps, request)


def layout_tower(depth: int, n_prompts: int, view_every_layer: bool = False) -> str:
    """The tower name for one prompt layout (registered on first use): rows of one forward share a layout."""
    name = f"{TOWER}/J{depth}/P{n_prompts}" + ("/view-every-layer" if view_every_layer else "")
    if name not in _LAYOUTS:
        register_tower(name, anople_forward)
        _LAYOUTS.add(name)
    return name


_LAYOUTS: set[str] = set()
register_tower(TOWER, anople_forward)
