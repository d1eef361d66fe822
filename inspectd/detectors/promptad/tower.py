"""PromptAD's value-value (V-V) dual-path image tower ("promptad_vv"): same CLIP weights, another forward.

Every block runs two paths from one ``qkv = W_in · ln_1(x_ori)`` (spec §2.2, official ``V2VTransformer``):

- original path (unchanged CLIP): ``x_ori ← x_ori + W_out softmax(q kᵀ / √d) v``, then ``+ MLP(ln_2(x_ori))``;
- V-V path: ``x_vv ← x_vv + W_out softmax(v vᵀ / √d) v`` (no FFN; its attention is computed from the
  *original* path's ``ln_1(x_ori)``, not from ``x_vv``); both start from the same embedded tokens.

Outputs (a `Features`): ``image_embeddings`` = original-path CLS → ln_post → proj (identical to the plain
tower's); ``patch_embeddings`` = V-V patch tokens → ln_post → proj (``patch_tokens``: before proj);
``blocks`` = *original-path* residual-stream patch tokens after the requested blocks (the memory layers).
All blocks are dual (the official code converts all 12); LayerScale, when a model has it, is applied to
both attention outputs (ViT-B-16-plus-240 has none). Windows are not computed by this tower.

Kernels: on CPU, when the backbone has oneDNN fused blocks (``model.cpu_kernels: auto|onednn``, fused.py) and no
gradient is wanted, every block runs as `fused.FusedBlocks.dual_block` (the blocks' oneDNN or MKL GEMMs,
`model.cpu_gemm`; the same maths), the last one for the original path's CLS token only unless that block is a memory tap
(`dual_cls_block`: ~5 % fewer FLOPs on ViT-B). The fused kernels have no autograd formula, so a forward that
needs gradients (grad mode on and the pixels or a tower weight requiring grad), ``cpu_kernels: torch``, a tower
fused.py does not support, and GPUs take open_clip's blocks (`dual_block`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from inspectd.detectors import fused
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, Features, register_tower

TOWER = "promptad_vv"


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, W] -> [N, H, L, W/H]."""
    n, length, width = x.shape
    return x.reshape(n, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, H, L, d] -> [N, L, H*d]."""
    n, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * dim)


def dual_block(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip ``ResidualAttentionBlock`` on the original-path state ``x`` [N, L, W]:
    (next original-path state, the V-V path's residual increment ``ls_1(W_out softmax(v vᵀ·scale) v)``)."""
    attn: nn.MultiheadAttention = block.attn
    if not getattr(attn, "batch_first", False) or attn.in_proj_weight is None:
        raise ValueError("the V-V tower needs batch-first attention with a packed in-projection")
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
    original = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head dim), as CLIP's
    value_value = F.scaled_dot_product_attention(v, v, v)
    both = F.linear(_merge_heads(torch.cat([original, value_value])), attn.out_proj.weight, attn.out_proj.bias)
    o_ori, o_vv = both.chunk(2)
    x = x + block.ls_1(o_ori)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, block.ls_1(o_vv)


def fused_blocks_for(backbone: ClipBackbone, tokens: torch.Tensor) -> fused.FusedBlocks | None:
    """The backbone's oneDNN blocks when this forward may use them (see the module docstring), else None."""
    blocks = backbone.fused_blocks
    if blocks is None:
        return None
    if torch.is_grad_enabled() and (tokens.requires_grad or any(
            p.requires_grad for p in backbone.visual.transformer.parameters())):
        return None  # the fused kernels are not differentiable
    return blocks


def vv_forward(backbone: ClipBackbone, pixels: torch.Tensor, request: FeatureRequest,
               row_inputs: Mapping[str, torch.Tensor] | None = None) -> Features:
    """The dual-path forward of [N, 3, S, S] (any S: positions are interpolated as the plain tower's)."""
    if request.windows:
        raise ValueError(f"tower {TOWER!r} does not compute window embeddings")
    x = backbone._embed_tokens(pixels)
    grid = backbone.input_grid(pixels)
    x_vv = x
    blocks = fused_blocks_for(backbone, x)
    taps: dict[int, torch.Tensor] = {}
    last = len(backbone.visual.transformer.resblocks) - 1
    for i, block in enumerate(backbone.visual.transformer.resblocks):
        if blocks is not None and i == last and i not in request.blocks:
            x, x_vv = blocks.dual_cls_block(x, x_vv)  # nothing reads the original path's other tokens now
        elif blocks is not None:
            x, x_vv = blocks.dual_block(i, x, x_vv)
        else:
            x, increment = dual_block(block, x)
            x_vv = x_vv + increment
        if i in request.blocks:
            taps[i] = x[:, 1:].float()
    features = backbone._outputs(x, grid, taps, FeatureRequest(tower=request.tower))  # CLS of the original path
    if request.patch_tokens or request.patch_embeddings:
        local = backbone.visual.ln_post(x_vv[:, 1:])
        if request.patch_tokens:
            features.patch_tokens = local.float()
        if request.patch_embeddings:
            proj = backbone.visual.proj
            features.patch_embeddings = (local @ proj if proj is not None else local).float()
    return features


def memory_blocks(depth: int, layers: tuple[int, ...] = ()) -> tuple[int, ...]:
    """0-based blocks of the memory taps: ``layers`` (1-based) or the paper's 3 and 8 of 12 scaled to
    ``depth`` as ceil(depth · l / 12) (24 blocks: 6, 16; 2 blocks: 1, 2)."""
    chosen = layers or tuple(-(-depth * layer // 12) for layer in (3, 8))
    if any(not 1 <= layer <= depth for layer in chosen):
        raise ValueError(f"memory layers {chosen} must be within 1..{depth} (1-based)")
    return tuple(sorted({layer - 1 for layer in chosen}))


register_tower(TOWER, vv_forward)
