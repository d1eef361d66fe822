"""oneDNN fused blocks: the same maths as open_clip's residual blocks, and a clear fallback."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, Transformer

from inspectd.detectors import fused
from inspectd.detectors.backbone import ClipBackbone, FeatureRequest, ModelSpec

pytestmark = pytest.mark.skipif(not fused.available(), reason="torch built without oneDNN")


def random_transformer(seed: int, **kwargs: object) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(width=64, layers=3, heads=4, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial LayerNorm affine, biases and layer scales
            p.add_(torch.randn_like(p) * 0.2)
    return model


VARIANTS = {
    "gelu": {},
    "gelu_tanh": {"act_layer": lambda: torch.nn.GELU(approximate="tanh")},
    "quick_gelu": {"act_layer": QuickGELU},
    "layer_scale": {"ls_init_value": 0.5},
}


@pytest.mark.parametrize("gemm", ["onednn", "blas"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("length", [5, 10, 26, 80])  # 80: attention on oneDNN Graph (fused.GraphAttention)
def test_fused_blocks_equal_open_clip(variant: str, length: int, gemm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "graph_attention", fused.GraphAttention())  # its own graphs, not the session's
    model = random_transformer(1, **VARIANTS[variant])
    assert fused.support(model, torch.float32) is None
    blocks = fused.FusedBlocks(model, rows_hint=64, gemm=gemm)
    linear = fused.BlasLinear if gemm == "blas" else fused.PackedLinear
    assert blocks.gemm == gemm
    assert all(isinstance(getattr(b, name), linear) for b in blocks.blocks for name in ("qkv", "out", "fc", "proj"))
    x = torch.randn(7, length, 64)
    graph_calls = fused.graph_attention.calls
    with torch.inference_mode():
        reference = model(x)
        torch.testing.assert_close(blocks(x), reference, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(blocks.cls_output(x), reference[:, 0], atol=2e-5, rtol=2e-5)
        y = x
        for i, block in enumerate(model.resblocks):  # block by block, as the feature taps use them
            expected = block(y)
            torch.testing.assert_close(blocks.block(i, y), expected, atol=2e-5, rtol=2e-5)
            y = expected
    took_graph = fused.graph_attention.calls > graph_calls
    assert took_graph == (length >= fused.GRAPH_ATTENTION_MIN_TOKENS and fused.graph_attention.broken is None)


@pytest.mark.parametrize(("avx2_only", "dtype", "expected"), [
    (True, torch.float32, "blas"),  # AMD Zen 3: MKL + a GELU pass beat oneDNN's AVX2 GELU epilogue (bench/gemm.py)
    (False, torch.float32, "onednn"),  # AVX-512 (Zen 4/5, Xeon): MKL takes its AVX2 path on AMD; oneDNN 2x on Zen 5
    (True, torch.bfloat16, "onednn"),  # bf16 blocks are oneDNN's
])
def test_auto_gemm_is_a_rule_of_the_cpu(avx2_only: bool, dtype: torch.dtype, expected: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "avx2_only", lambda: avx2_only)
    assert fused.auto_gemm(dtype) == expected
    asked: list[torch.dtype] = []
    monkeypatch.setattr(fused, "auto_gemm", lambda d: asked.append(d) or "blas")
    assert fused.FusedBlocks(random_transformer(0), rows_hint=64).gemm == "blas"
    assert asked == [torch.float32]  # the tower's own dtype decides
    with pytest.raises(ValueError, match="cpu_gemm"):
        fused.FusedBlocks(random_transformer(0), gemm="mkl")


def test_a_process_that_lowers_torch_s_dispatch_level_picks_the_same_gemm() -> None:
    """ATEN_CPU_CAPABILITY sets torch's dispatch level per process (avx2 on an AVX-512 CPU, default on an AVX2 one);
    the GEMM choice reads the CPU itself, so two processes on one machine never run apart."""
    override = "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "default"
    code = "import torch; from inspectd.detectors import fused; print(fused.auto_gemm(torch.float32))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": override},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == fused.auto_gemm(torch.float32)


def test_the_blas_gemm_runs_on_the_tower_s_own_weights_and_the_bias_once() -> None:
    """No second copy of the tower's weights where no scale is folded in (oneDNN's prepacked copy is one), and
    every post-op BlasLinear takes is one oneDNN's epilogue has."""
    model = random_transformer(3)
    blocks = fused.FusedBlocks(model, rows_hint=64, gemm="blas")
    assert blocks.blocks[0].qkv.weight.data_ptr() == model.resblocks[0].attn.in_proj_weight.data_ptr()
    layer = fused.BlasLinear.pack(torch.randn(8, 4), torch.randn(8))
    x = torch.randn(3, 4)
    plain = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x, "gelu", "tanh"), F.gelu(plain, approximate="tanh"))
    torch.testing.assert_close(layer(x, "swish"), F.silu(plain))
    torch.testing.assert_close(layer.add_to(x, torch.ones(3, 8)), plain + 1)
    with pytest.raises(ValueError, match="post-op"):
        layer(x, "relu")


def test_a_block_runs_on_groups_of_whole_sequences_within_the_row_bound() -> None:
    """A batch's token rows go through each block in groups of whole sequences of at most chunk_rows rows (GEMMs
    with cache-sized outputs), and the stacked groups are the block's output over every row at once."""
    model = random_transformer(2)
    blocks = fused.FusedBlocks(model, rows_hint=64)
    seen: list[tuple[int, int]] = []
    inner = blocks.blocks[0]

    def recording(rows: torch.Tensor, sequences: int) -> torch.Tensor:
        seen.append((rows.shape[0], sequences))
        return inner(rows, sequences)

    blocks.blocks[0] = recording  # type: ignore[assignment]
    x = torch.randn(9, 26, 64)
    with torch.inference_mode():
        grouped = blocks.block(0, x)
        blocks.chunk_rows = 1 << 20
        whole = blocks.block(0, x)
    assert seen[:-1] == [(52, 2), (52, 2), (52, 2), (52, 2), (26, 1)]  # 2 sequences of 26 fit in 64 rows
    assert seen[-1] == (234, 9)
    torch.testing.assert_close(grouped, whole, atol=2e-5, rtol=2e-5)
    seen.clear()
    blocks.chunk_rows = 104  # 4 sequences fit: 5 go as 3 + 2, not 4 + a short remainder of 1
    with torch.inference_mode():
        torch.testing.assert_close(blocks.block(0, x[:5]), whole[:5], atol=2e-5, rtol=2e-5)
    assert seen == [(78, 3), (52, 2)]


def test_groups_are_as_even_as_whole_sequences_allow() -> None:
    """WinCLIP's 3x3 windows of two 240-px tiles: 338 sequences of 10 tokens at 2 048 rows go as 2 x 169, not
    204 + a 134-sequence remainder (whose 1 340 rows ran bf16's 896-wide linears at half the rate on AMX)."""
    assert fused.even_groups(338, 10, 2048) == [(0, 169), (169, 338)]
    assert fused.even_groups(392, 5, 2048) == [(0, 392)]  # 1 960 rows fit one group
    assert fused.even_groups(450, 5, 2048) == [(0, 225), (225, 450)]
    assert fused.even_groups(9, 26, 64) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert fused.even_groups(3, 300, 64) == [(0, 1), (1, 2), (2, 3)]  # a sequence over the bound goes alone
    assert fused.even_groups(4, 26, 1 << 20) == [(0, 4)]
    assert fused.even_groups(0, 26, 64) == []  # no sequences, no (empty) group


def test_graph_attention_equals_sdpa_on_strided_views_fuses_and_bounds_its_graphs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    attention = fused.GraphAttention()
    if attention.broken:
        pytest.skip(attention.broken)
    monkeypatch.setattr(fused, "GRAPH_ATTENTION_CACHE", 2)
    for sequences, length in ((2, 226), (3, 226), (2, 100), (2, 226)):
        qkv = torch.randn(sequences * length, 3 * 4 * 16).view(sequences, length, 3, 4, 16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # as the blocks call it: strided [S, H, L, d]
        with torch.inference_mode():
            torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attention(v, v, v), F.scaled_dot_product_attention(v, v, v),
                                       atol=1e-5, rtol=1e-5)
    assert "oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())  # oneDNN Graph ran it
    fresh, repeat = torch.randn(1, 4, 150, 16), fused.GraphAttention()
    with torch.inference_mode():  # a new shape's first result is the fused kernel's too: scoring is repeatable
        results = [repeat(fresh, fresh, fresh) for _ in range(3)]
    assert repeat.calls == 3 and all(torch.equal(results[0], r) for r in results[1:])
    # q/k/v and v/v/v share shapes and strides (one graph); (2, 226) and (3, 226) fill the two places, so
    # (2, 100) keeps SDPA: 3 shapes with a graph-call pair each
    assert len(attention._graphs) == 2
    assert attention.calls == 6 and attention.broken is None


def test_graph_attention_steps_aside_for_short_sequences_flop_counting_autocast_and_failures(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from bench.flops import counted_flops

    attention = fused.GraphAttention()
    q = k = v = torch.randn(2, 4, 100, 16)
    short = torch.randn(2, 4, 10, 16)
    attention(short, short, short)
    flops, _ = counted_flops(lambda: attention(q, k, v))  # a dispatch mode must see the attention op
    assert attention.calls == 0 and flops == 4 * 2 * 4 * 100 * 100 * 16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a trace would bake bf16 in
        assert attention(q, k, v).dtype == F.scaled_dot_product_attention(q, k, v).dtype
    assert attention.calls == 0 and not attention._graphs

    attention(q, k, v)
    assert attention.calls == 1
    graph_key = next(iter(attention._graphs))

    def failing_graph(*args: object) -> None:
        raise RuntimeError("out of memory")

    attention._graphs[graph_key] = failing_graph  # a built graph that raises: SDPA for that call, not for good
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert attention.failures == 1 and attention.broken is None and "out of memory" in caplog.text

    def broken_trace(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no oneDNN Graph here")

    unfused = fused.GraphAttention()  # a build whose TorchScript leaves the pattern unfused: SDPA, not slower ops
    monkeypatch.setattr(torch.jit, "last_executed_optimized_graph", lambda: "graph(%q) aten::matmul aten::softmax")
    torch.testing.assert_close(unfused(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert unfused.broken and "did not fuse" in unfused.broken and unfused.calls == 0
    monkeypatch.setattr(torch.jit, "trace", broken_trace)  # a trace that fails: SDPA from now on
    other = torch.randn(2, 4, 120, 16)
    torch.testing.assert_close(attention(other, other, other), F.scaled_dot_product_attention(other, other, other))
    assert attention.broken and "no oneDNN Graph here" in caplog.text
    assert not attention.wanted(q)


def test_fused_blocks_bf16_close_to_fp32() -> None:
    model = random_transformer(2)
    if reason := fused.support(model, torch.bfloat16):
        pytest.skip(reason)
    x = torch.randn(5, 10, 64)
    with torch.inference_mode():
        reference = model(x)
        fast = fused.FusedBlocks(model.to(torch.bfloat16), rows_hint=64)(x.to(torch.bfloat16)).float()
    assert (fast - reference).abs().max() < 0.1 * reference.abs().max()


def test_unsupported_blocks_say_why() -> None:
    assert "block 0" in (fused.support(random_transformer(0, scale_fc=True), torch.float32) or "")
    assert "dtype" in (fused.support(random_transformer(0), torch.float16) or "")


@pytest.mark.parametrize("as_without_onednn_bf16", [False, True])
def test_a_bf16_backbone_scores_on_any_cpu_fused_only_where_onednn_has_bf16(
        tiny_checkpoint: Path, as_without_onednn_bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without AVX-512 (AMD Zen 3) oneDNN's bf16 weight reorder raised at build; bf16 now takes
    open_clip's blocks there and says why (here also forced, so every CPU runs the fallback)."""
    if as_without_onednn_bf16:
        monkeypatch.setattr(fused, "onednn_bf16", lambda: False)
    spec = ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu")
    half = ClipBackbone(dataclasses.replace(spec, precision="bf16"))
    full = ClipBackbone(spec)
    has_bf16 = fused.onednn_bf16()
    assert half.describe()["kernels"] == ("onednn" if has_bf16 else "torch")
    assert (fused.support(half.visual.transformer, torch.bfloat16) is None) == has_bf16
    pixels = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    request = FeatureRequest(blocks=frozenset({1}), patch_tokens=True, windows=frozenset({2}))
    a, b = half.forward(pixels, request), full.forward(pixels, request)
    for got, want in ((a.image_embeddings, b.image_embeddings), (a.patch_tokens, b.patch_tokens)):
        error = (got.float() - want).abs().max()
        assert 0 < error < 0.1 * want.abs().max()  # bf16's rounding shows: it ran in bf16, and close to fp32


@pytest.mark.parametrize("gemm", ["auto", "onednn", "blas"])
def test_backbone_uses_fused_blocks_on_cpu_and_equals_open_clip(tiny_checkpoint: Path, gemm: str) -> None:
    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                  cpu_gemm=gemm))
    plain = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                   cpu_kernels="torch"))
    assert fast.describe()["kernels"] == "onednn" and plain.describe()["kernels"] == "torch"
    assert fast.describe()["gemm"] == (fused.auto_gemm(torch.float32) if gemm == "auto" else gemm)
    assert plain.describe()["gemm"] == ""
    pixels = torch.randn(2, 3, 240, 240)
    request = FeatureRequest(blocks=frozenset({0, 1}), patch_tokens=True, patch_embeddings=True,
                             windows=frozenset({2, 3}))
    a, b = fast.forward(pixels, request), plain.forward(pixels, request)
    torch.testing.assert_close(a.image_embeddings, b.image_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, atol=1e-5, rtol=1e-5)
    for i in (0, 1):
        torch.testing.assert_close(a.blocks[i], b.blocks[i], atol=1e-5, rtol=1e-5)
    for k in (2, 3):
        torch.testing.assert_close(a.windows[k], b.windows[k], atol=1e-5, rtol=1e-5)


def test_the_config_s_cpu_gemm_reaches_the_blocks(tiny_checkpoint: Path) -> None:
    from inspectd.daemon.app import build_backbone
    from inspectd.daemon.config import parse_config

    for gemm in ("blas", "onednn"):
        config = parse_config({"model": {"arch": "inspectd-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu",
                                         "cpu_gemm": gemm}})
        assert build_backbone(config).describe()["gemm"] == gemm


def test_a_forward_for_the_image_embedding_alone_runs_the_last_block_for_cls_only(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu"))
    plain = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                                   cpu_kernels="torch"))
    calls: list[tuple[int, ...]] = []
    original = fused.FusedBlocks.cls_block
    monkeypatch.setattr(fused.FusedBlocks, "cls_block",
                        lambda self, x: calls.append(tuple(x.shape)) or original(self, x))
    pixels = torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(5))
    depth = len(fast.visual.transformer.resblocks)
    got = fast.forward(pixels, FeatureRequest(blocks=frozenset({0})))
    assert calls == [(3, 226, fast.width)]
    torch.testing.assert_close(got.image_embeddings, plain.forward(pixels, FeatureRequest()).image_embeddings,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.blocks[0], plain.forward(pixels, FeatureRequest(blocks=frozenset({0}))).blocks[0],
                               atol=1e-5, rtol=1e-5)
    for needs_every_token in (FeatureRequest(patch_tokens=True), FeatureRequest(patch_embeddings=True),
                              FeatureRequest(blocks=frozenset({depth - 1}))):
        calls.clear()
        fast.forward(pixels, needs_every_token)
        assert calls == []


def test_required_onednn_on_an_unsupported_tower_is_a_clear_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="cpu_kernels=onednn.*dtype"):
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                               precision="fp16", cpu_kernels="onednn"))
    with pytest.raises(ValueError, match="cpu_kernels must be"):
        ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu",
                               cpu_kernels="fast"))
