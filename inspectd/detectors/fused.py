"""CPU inference kernels for the image tower's residual blocks: oneDNN prepacked (or MKL) linears, fused attention.

open_clip's `ResidualAttentionBlock` on CPU calls MKL's GEMM with the weights in their training
layout and runs GELU, residual adds and the attention's head shuffles as separate passes over
memory. On CPUs with AVX-512 (and on AMD, where MKL does not pick its fastest path) oneDNN with
weights reordered once into its blocked layout is 10-20 % faster per GEMM, and it fuses the
activation and the residual add into the GEMM's epilogue (bench/winclip.py measures both).
`FusedBlocks` runs the same maths with those kernels, inference only, and
`FusedBlocks.cls_output` / `cls_block` run the last block for the CLS token alone (what the window pass and a
forward that reads only the image embedding need), and
`FusedBlocks.dual_block` runs a block with PromptAD's value-value path beside it (promptad/tower.py), and
`FusedBlocks.dual_cls_block` the last one of those for the original path's CLS token only.
Attention over ViT-length sequences runs on oneDNN Graph's fused kernel (`GraphAttention`), shorter ones on SDPA;
`pack_linear` packs any other inference linear (APRIL-GAN's adapters).

The blocks' linears run on one of two GEMM libraries (`GEMMS`, `model.cpu_gemm`): oneDNN prepacked, with GELU and
the residual add in its epilogue, or the BLAS torch links (MKL; `BlasLinear`), the activation and add as separate
passes. `auto_gemm` picks oneDNN where the CPU has AVX-512 and BLAS on AVX2-only x86 CPUs, where oneDNN's AVX2
kernels and above all its GELU epilogue are the slower: on an AMD Zen 3, MLP-up at 452 rows 106 GFLOP/s fused
against 158 for MKL plus a GELU pass; WinCLIP's window passes 1.12-1.23x and a full pass 1.05x faster on MKL
(`python -m bench.gemm`, bench/RESULTS.md).

Only the structure this file knows is taken over (plain or layer-scaled blocks, GELU or QuickGELU,
self-attention without masks); anything else keeps open_clip's own forward (`support` says why).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

log = logging.getLogger(__name__)

QUICK_GELU_ALPHA = 1.702  # open_clip's QuickGELU: x * sigmoid(1.702 x)
GRAPH_ATTENTION_MIN_TOKENS = 64  # shorter sequences (WinCLIP's 5- and 10-token windows): CPU SDPA is faster
GRAPH_ATTENTION_CACHE = 32  # q/k/v shapes that get a traced graph (kept for the process: see GraphAttention)


GEMMS = ("auto", "onednn", "blas")
NO_ONEDNN_BF16 = "this CPU has no oneDNN bf16 kernels (they need AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (without them its bf16 weight reorder raises)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_gemm(gemm: str) -> None:
    if gemm not in GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(GEMMS)}, not {gemm!r}")


def auto_gemm(dtype: torch.dtype) -> str:
    """The GEMM library `model.cpu_gemm: auto` runs the blocks' linears on: "blas" for fp32 on an x86 CPU whose best
    vector ISA is AVX2, else "onednn" (AVX-512 CPUs, where MKL takes its AVX2 path on AMD and oneDNN ran 2x faster on
    Zen 5; bf16, which only oneDNN's blocks run; other architectures, not measured). A rule of the CPU rather than
    a timing at load, so every process on a machine runs the same kernels and gives the same scores."""
    return "blas" if dtype == torch.float32 and avx2_only() else "onednn"


def avx2_only() -> bool:
    """An x86 CPU with AVX2 and no AVX-512, read from the CPU itself (torch's dispatch level,
    `get_cpu_capability`, follows the ATEN_CPU_CAPABILITY variable: a process started with it would pick apart)."""
    return torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_supported()


def support(transformer: torch.nn.Module, dtype: torch.dtype) -> str | None:
    """None when every block can run fused, else the reason it cannot."""
    if not available():
        return "this torch build has no oneDNN linear kernels"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype} (oneDNN blocks run fp32 or bf16)"
    if dtype == torch.bfloat16 and not onednn_bf16():
        return NO_ONEDNN_BF16
    for i, block in enumerate(getattr(transformer, "resblocks", [])):
        reason = _block_support(block)
        if reason:
            return f"block {i}: {reason}"
    return None if len(getattr(transformer, "resblocks", [])) else "no resblocks"


def _block_support(block: torch.nn.Module) -> str | None:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention):
        return f"{type(block).__name__} has no nn.MultiheadAttention"
    if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None:
        return "attention is not plain batch-first self-attention"
    if hasattr(block, "ln_1_kv") or hasattr(block, "ln_attn"):
        return "cross-attention or scaled-attention block"
    mlp = getattr(block, "mlp", None)
    if mlp is None or list(getattr(mlp, "_modules", {})) != ["c_fc", "gelu", "c_proj"]:
        return "MLP is not c_fc -> activation -> c_proj"
    if _activation(mlp.gelu) is None:
        return f"activation {type(mlp.gelu).__name__}"
    for name in ("ls_1", "ls_2"):
        scale = getattr(block, name, None)
        if not isinstance(scale, torch.nn.Identity) and not hasattr(scale, "gamma"):
            return f"{name} is {type(scale).__name__}"
    return None


def _activation(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    return None


class GraphAttention:
    """softmax(q kᵀ / √d) v on CPU through oneDNN Graph's fused attention (TorchScript's oneDNN fusion of the
    traced matmul-scale-softmax-matmul pattern): 2x the rate of torch's CPU SDPA at ViT lengths (226 tokens:
    300-340 vs 150-165 GFLOP/s, `python -m bench.threads`), the same maths to ~1e-6.

    One trace per q/k/v shape and strides. TorchScript keeps every traced function for the life of the process
    (~2.5 MB each, with its compiled kernels), so at most GRAPH_ATTENTION_CACHE shapes get a graph and later
    ones keep SDPA (a daemon sees a handful: batch sizes x a few sequence shapes). fp32 sequences of at least
    GRAPH_ATTENTION_MIN_TOKENS only; SDPA under CPU autocast, under a dispatch mode (FLOP counting, which must
    see the op) and for the call whose graph raised. A trace that fails turns it off (logged once).
    Side effect: the first trace turns on TorchScript's oneDNN fusion for the whole process
    (`torch.jit.enable_onednn_fusion`); inspectd runs no other TorchScript."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, Callable[..., torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.broken: str | None = None if hasattr(torch.jit, "enable_onednn_fusion") else "no oneDNN Graph"
        self.calls = 0  # attention calls the fused graph ran (tests count them)
        self.failures = 0  # calls whose graph raised (each fell back to SDPA)
        self._full_noted = False

    def wanted(self, q: torch.Tensor) -> bool:
        return (self.broken is None and q.dtype == torch.float32 and q.device.type == "cpu"
                and q.shape[-2] >= GRAPH_ATTENTION_MIN_TOKENS and not is_in_torch_dispatch_mode()
                and not _cpu_autocast())

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        graph = self._graph(q, k, v) if self.wanted(q) else None
        if graph is None:
            return F.scaled_dot_product_attention(q, k, v)
        try:
            out = graph(q, k, v)
        except Exception as exc:  # noqa: BLE001 - this call takes SDPA (which raises too if the input is bad)
            self.failures += 1
            log.warning("oneDNN Graph attention failed for %s (%s: %s); SDPA for this call",
                        tuple(q.shape), type(exc).__name__, exc)
            return F.scaled_dot_product_attention(q, k, v)
        self.calls += 1
        return out

    def _graph(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        key = (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape), v.stride())
        graph = self._graphs.get(key)
        if graph is not None or len(self._graphs) >= GRAPH_ATTENTION_CACHE:
            if graph is None and not self._full_noted:
                self._full_noted = True
                log.info("oneDNN Graph attention: %d shapes traced, new shapes keep SDPA", len(self._graphs))
            return graph
        try:  # traced outside the lock: a build thread's new shape must not stall the engine thread's lookups
            graph = _trace_attention(q, k, v)
        except Exception as exc:  # noqa: BLE001 - a torch without working oneDNN Graph keeps SDPA
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("oneDNN Graph attention could not be traced (%s); CPU SDPA from now on", self.broken)
            return None
        with self._lock:
            return self._graphs.setdefault(key, graph)


def _trace_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[..., torch.Tensor]:
    torch.jit.enable_onednn_fusion(True)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)

    with warnings.catch_warnings():  # TorchScript's deprecation and tracer notes
        warnings.simplefilter("ignore")
        graph = torch.jit.trace(attention, (q, k, v), check_trace=False)
        # TorchScript's first call profiles with plain ops and the next one builds the fused graph: run both here,
        # so every result of this shape comes from the same kernel (the same frame scores the same twice)
        for _ in range(2):
            graph(q, k, v)
    if "oneDNNFusionGroup" not in str(torch.jit.last_executed_optimized_graph()):  # (thread-local in TorchScript)
        raise RuntimeError("TorchScript did not fuse the attention into oneDNN Graph on this build (unfused it would "
                           "be slower than SDPA)")
    return graph


def _cpu_autocast() -> bool:
    """A trace would bake CPU autocast's dtype in: attention under it keeps SDPA."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


graph_attention = GraphAttention()


@dataclass
class PackedLinear:
    """x Wᵀ + b with W reordered once for oneDNN (inference only); `post` is fused into the GEMM. The blocks'
    layers, `pack_linear` and the few-shot memory banks (detectors/memory.py) use it."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> PackedLinear:
        return cls(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint),
                   None if bias is None else bias.detach().contiguous())

    def __call__(self, x: torch.Tensor, post: str = "none", algorithm: str = "") -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, post, [], algorithm)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + linear(x), the add done in the GEMM's epilogue."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")


@dataclass
class BlasLinear:
    """`PackedLinear`'s calls on the BLAS torch links (MKL): x Wᵀ + b by F.linear, `post` and the residual add as
    in-place passes after it (where oneDNN's own AVX2 kernels are the slower: `auto_gemm`)."""

    weight: torch.Tensor  # [out, in], as nn.Linear keeps it
    bias: torch.Tensor | None

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int = 0) -> BlasLinear:
        return cls(weight.detach().contiguous(), None if bias is None else bias.detach().contiguous())

    def __call__(self, x: torch.Tensor, post: str = "none", algorithm: str = "") -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if post == "gelu":
            return torch.ops.aten.gelu_(y, approximate="tanh" if algorithm == "tanh" else "none")
        if post == "swish":
            return F.silu(y, inplace=True)
        if post != "none":
            raise ValueError(f"BlasLinear has no post-op {post!r}")
        return y

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + linear(x)."""
        return F.linear(x, self.weight, self.bias).add_(residual)


def source_version(tensor: torch.Tensor) -> int | None:
    """What a packed copy of ``tensor`` is stale against: its in-place version counter (None for an inference
    tensor, which has none and cannot change outside inference mode)."""
    return None if tensor.is_inference() else tensor._version


def pack_linear(linear: torch.nn.Module, rows_hint: int = 1024) -> PackedLinear:
    """An ``nn.Linear``'s weights reordered once for oneDNN (inference only): called on [..., in] rows it gives
    the layer's output, 2-2.5x MKL's rate on AMD at the ViT's widths."""
    return PackedLinear.pack(linear.weight, linear.bias, rows_hint)


class _Block:
    """One residual block: x + ls1 * attn(ln1(x)); x + ls2 * mlp(ln2(x)), on 2-D token rows."""

    def __init__(self, block: torch.nn.Module, rows_hint: int, split_qkv: bool = False, gemm: str = "onednn"
                 ) -> None:
        linear = BlasLinear if gemm == "blas" else PackedLinear
        attn: torch.nn.MultiheadAttention = block.attn
        width = attn.embed_dim
        self.heads = attn.num_heads
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        in_w, in_b = attn.in_proj_weight.detach(), attn.in_proj_bias
        self.qkv = linear.pack(in_w, in_b, rows_hint)
        if split_qkv:  # for cls_output: the query of token 0 only, keys and values of all tokens
            self.q = linear.pack(in_w[:width], None if in_b is None else in_b[:width], rows_hint)
            self.kv = linear.pack(in_w[width:], None if in_b is None else in_b[width:], rows_hint)
        out_w, out_b = _scaled(attn.out_proj.weight, attn.out_proj.bias, block.ls_1)
        self.out = linear.pack(out_w, out_b, rows_hint)
        fc_w, fc_b = block.mlp.c_fc.weight.detach(), block.mlp.c_fc.bias
        proj_w, proj_b = _scaled(block.mlp.c_proj.weight, block.mlp.c_proj.bias, block.ls_2)
        kind = _activation(block.mlp.gelu)
        if kind == "quick_gelu":
            # x*sigmoid(a x) = swish(a x) / a: scale c_fc by a (oneDNN's swish has a fixed slope of 1)
            # and fold the 1/a into c_proj's weights.
            fc_w = fc_w * QUICK_GELU_ALPHA
            fc_b = None if fc_b is None else fc_b.detach() * QUICK_GELU_ALPHA
            proj_w = proj_w / QUICK_GELU_ALPHA
            self.post, self.algorithm = "swish", ""
        else:
            self.post, self.algorithm = "gelu", "tanh" if kind == "gelu_tanh" else "none"
        self.fc = linear.pack(fc_w, fc_b, rows_hint)
        self.proj = linear.pack(proj_w, proj_b, rows_hint)

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(self.ln_2(x), self.post, self.algorithm)
        return self.proj.add_to(hidden, x)

    def __call__(self, x: torch.Tensor, sequences: int) -> torch.Tensor:
        rows, width = x.shape
        length, head_dim = rows // sequences, width // self.heads
        qkv = self.qkv(self.ln_1(x)).view(sequences, length, 3, self.heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [S, H, L, d] each, strided views
        attended = graph_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(rows, width)
        return self._mlp_residual(self.out.add_to(attended, x))

    def _token0_attention(self, x: torch.Tensor, sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention for token 0 of each sequence over all its tokens: (token 0's rows of ``x`` [S, W], its
        attention output [S, W], every token's values [S, L, H, d])."""
        rows, width = x.shape
        length, head_dim = rows // sequences, width // self.heads
        normed = self.ln_1(x)
        cls_rows = x.view(sequences, length, width)[:, 0].contiguous()
        q = self.q(normed.view(sequences, length, width)[:, 0].contiguous()).view(sequences, self.heads, head_dim)
        k, v = self.kv(normed).view(sequences, length, 2, self.heads, head_dim).unbind(2)  # [S, L, H, d]
        weights = torch.einsum("shd,slhd->shl", q, k).mul_(1.0 / math.sqrt(head_dim)).softmax(dim=-1)
        attended = torch.einsum("shl,slhd->shd", weights, v).reshape(sequences, width)
        return cls_rows, attended, v

    def cls_output(self, x: torch.Tensor, sequences: int) -> torch.Tensor:
        """The block's output for token 0 of each sequence only: [S, W] (keys/values from all tokens)."""
        cls_rows, attended, _ = self._token0_attention(x, sequences)
        return self._mlp_residual(self.out.add_to(attended, cls_rows))

    def dual(self, x: torch.Tensor, x_vv: torch.Tensor, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PromptAD's value-value dual path (promptad/tower.py) on 2-D token rows: (this block's output for
        ``x``, ``x_vv + ls1 * W_out softmax(v vᵀ / √d) v``) with q, k, v all from ``ln_1(x)``, the
        original path's; the V-V path has no MLP, and both residual adds are the out-projection's (`add_to`)."""
        rows, width = x.shape
        length, head_dim = rows // sequences, width // self.heads
        qkv = self.qkv(self.ln_1(x)).view(sequences, length, 3, self.heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [S, H, L, d] each, strided views
        attended = graph_attention(q, k, v).transpose(1, 2).reshape(rows, width)
        value_value = graph_attention(v, v, v).transpose(1, 2).reshape(rows, width)
        return self._mlp_residual(self.out.add_to(attended, x)), self.out.add_to(value_value, x_vv)

    def dual_cls(self, x: torch.Tensor, x_vv: torch.Tensor, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`dual` when only token 0 of the original path is read after this block: ([S, W] its output for token 0,
        the V-V path's next rows for every token). The query, out-projection and MLP run for token 0 only."""
        cls_rows, attended, v = self._token0_attention(x, sequences)
        v = v.transpose(1, 2)  # [S, H, L, d] (a view of the kv projection)
        value_value = graph_attention(v, v, v).transpose(1, 2).reshape(x.shape)
        return self._mlp_residual(self.out.add_to(attended, cls_rows)), self.out.add_to(value_value, x_vv)


def _scaled(weight: torch.Tensor, bias: torch.Tensor | None,
            layer_scale: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a LayerScale (gamma * (W x + b)) into the linear layer before it."""
    weight = weight.detach()
    gamma = getattr(layer_scale, "gamma", None)
    if gamma is None:
        return weight, bias
    gamma = gamma.detach()
    return weight * gamma[:, None], None if bias is None else bias.detach() * gamma


def even_groups(sequences: int, length: int, max_rows: int) -> list[tuple[int, int]]:
    """(start, end) of the fewest groups of whole sequences of ``length`` rows each holding at most ``max_rows`` rows
    (at least one sequence), as even as whole sequences allow: a short last group is a GEMM shape oneDNN may run far
    slower (bf16 on AMX: a 1 340-row remainder ran the 896-wide linears at half the rate of 2 040 rows)."""
    if sequences <= 0:
        return []
    groups = max(1, -(-sequences // max(1, max_rows // length)))
    base, extra = divmod(sequences, groups)
    return list(itertools.pairwise(i * base + min(i, extra) for i in range(groups + 1)))


class FusedBlocks:
    """The tower's residual blocks with their linears on `gemm`'s library; call on [S, L, W] like the transformer."""

    def __init__(self, transformer: torch.nn.Module, rows_hint: int = 2048, gemm: str = "auto") -> None:
        check_gemm(gemm)
        last = len(transformer.resblocks) - 1
        dtype = transformer.resblocks[0].attn.in_proj_weight.dtype
        self.gemm = auto_gemm(dtype) if gemm == "auto" else gemm  # the library the linears run on
        self.blocks = [_Block(block, rows_hint, split_qkv=i == last, gemm=self.gemm)
                       for i, block in enumerate(transformer.resblocks)]
        # a block runs on groups of whole sequences of at most this many token rows: a GEMM whose output and MLP
        # hidden rows stay cache-sized runs 15-30 % faster than one over a batch's every row (bench/chunks.py)
        self.chunk_rows = rows_hint

    def _in_groups(self, step: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], *xs: torch.Tensor
                   ) -> tuple[torch.Tensor, ...]:
        """``step(*rows, sequences)`` on row sets [S, L, W] of the same sequences, in `even_groups` of at most
        `chunk_rows` rows (one group when they all fit); each of its outputs stacked back to [S, L', W]."""
        sequences, length, width = xs[0].shape
        parts = [step(*(x[start:end].reshape(-1, width) for x in xs), end - start)
                 for start, end in even_groups(sequences, length, self.chunk_rows)]
        columns = [part if isinstance(part, tuple) else (part,) for part in parts]
        outputs = columns[0] if len(columns) == 1 else tuple(torch.cat(column) for column in zip(*columns, strict=True))
        return tuple(output.view(sequences, -1, width) for output in outputs)

    def __len__(self) -> int:
        return len(self.blocks)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on [S, L, W]."""
        return self._in_groups(self.blocks[i], x)[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.blocks)):
            x = self.block(i, x)
        return x

    def cls_output(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block for token 0 only: [S, W]; the last block skips the other tokens'
        query, attention output and MLP, which nothing reads."""
        for i in range(len(self.blocks) - 1):
            x = self.block(i, x)
        return self.cls_block(x)[:, 0]

    def cls_block(self, x: torch.Tensor) -> torch.Tensor:
        """The last block on [S, L, W] for token 0 only: [S, 1, W] (for a forward that reads the CLS token alone)."""
        return self._in_groups(self.blocks[-1].cls_output, x)[0]

    def dual_block(self, i: int, x: torch.Tensor, x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i`` on [S, L, W] with PromptAD's value-value path (`_Block.dual`): (next ``x``, next ``x_vv``)."""
        x, x_vv = self._in_groups(self.blocks[i].dual, x, x_vv)
        return x, x_vv

    def dual_cls_block(self, x: torch.Tensor, x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block as `dual_block` for a caller that reads token 0 of the original path only
        (`_Block.dual_cls`): ([S, 1, W] original-path token 0, next ``x_vv`` [S, L, W])."""
        cls, x_vv = self._in_groups(self.blocks[-1].dual_cls, x, x_vv)
        return cls, x_vv
