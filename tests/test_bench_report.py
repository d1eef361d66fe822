"""The benchmark report (bench/run.py): the FMA microkernel, FLOP counting, Markdown/JSON rendering, the targets
check and the CUDA path's device-free logic. The report's full run itself is not part of the suite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import breakdown, gpu, peak, report
from bench.common import matmul_gflops
from bench.detectors import add_ratios
from bench.flops import counted_flops
from bench.run import Run, bf16_runnable, bounds_of, merge_ceilings, parse_args
from inspectd.detectors import fused

REPO = Path(__file__).resolve().parents[1]

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile
"""


# ---------------------------------------------------------------------------------------------- microkernel
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_microkernel_builds_and_reports_a_peak_above_half_the_gemm_rate(tmp_path: Path) -> None:
    flags = peak.cpu_flags()
    if peak.kernel_isa(flags) is None:
        pytest.skip("CPU without AVX2 + FMA")
    binary, how = peak.build_kernel(tmp_path, flags)
    assert binary is not None, how
    assert how.startswith("gcc ") and "-march=native" in how
    result = peak.run_kernel(binary, torch.get_num_threads(), seconds=0.02, runs=1)
    gemm = matmul_gflops(torch.float32, n=1024)
    assert result["isa"] == peak.kernel_isa(flags)
    assert result["threads"] == torch.get_num_threads()
    assert result["fp32_gflops"] > 0 and result["fp32_gflops_1thread"] > 0
    assert result["fp32_gflops"] >= 0.5 * gemm, (result, gemm)  # sanity: a GEMM cannot beat the FMA units
    if "avx512_bf16" in flags:
        assert result["bf16_gflops"] > 0
    else:
        assert result["bf16_gflops"] is None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_on_a_cpu_with_amx_tiles_the_bf16_peak_is_the_tile_rate(tmp_path: Path) -> None:
    """A bf16 GEMM on AMX runs ~10x past vdpbf16ps (2 756 vs 246 GFLOP/s measured on a Xeon): rating bf16 against
    the vector dot product gave ratios above 1."""
    flags = peak.cpu_flags()
    if not {"amx_bf16", "amx_tile", "avx512_bf16"} <= flags:
        pytest.skip("CPU without AMX bf16 tiles")
    binary, how = peak.build_kernel(tmp_path, flags)
    assert binary is not None, how
    measured = peak.run_kernel(binary, 1, seconds=0.02, runs=1)
    if measured["amx_note"] is not None:  # gcc too old for AMX, or a kernel that refuses tile data
        pytest.skip(measured["amx_note"])
    assert measured["amx_bf16_gflops"] > 4 * measured["bf16_gflops"], measured
    gemm = matmul_gflops(torch.bfloat16, n=1024)
    chosen = peak.peak_of(measured, threads=1)
    assert chosen["bf16_isa"] == "amx_bf16 tdpbf16ps" and chosen["bf16_gflops"] == chosen["amx_bf16_gflops"]
    assert chosen["bf16_gflops"] * torch.get_num_threads() >= gemm, (chosen, gemm)  # a GEMM cannot beat the tiles


BF16_CPUS = [  # (oneDNN has bf16 kernels, /proc/cpuinfo flags, why bf16 is not measured)
    (True, {"avx512_bf16"}, None),
    (False, {"avx512_bf16"}, "no oneDNN bf16 kernels"),  # AMD Zen 3: torch's reference loops
    (True, {"avx512f"}, "no bf16 dot-product instructions"),  # Skylake: emulated, and no bf16 section to rate
]


@pytest.mark.parametrize(("onednn_bf16", "flags", "skipped"), BF16_CPUS)
def test_bf16_gemms_are_timed_only_where_the_cpu_has_bf16_kernels(onednn_bf16: bool, flags: set[str],
                                                                   skipped: str | None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On AMD Zen 3 (AVX2) torch's bf16 matmul is a reference loop: timing it took the --quick report's first
    seven minutes. There the bf16 ceilings are None with the reason, in the JSON and in the report's rows."""
    if skipped is None and not fused.onednn_bf16():
        pytest.skip("oneDNN has no bf16 kernels on this CPU: timing them would take minutes")
    monkeypatch.setattr(fused, "onednn_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(peak, "cpu_flags", lambda cpuinfo=None: flags)
    timed: list[torch.dtype] = []
    real_mm, real_bound = peak.matmul_gflops, peak.fp32_flop_bound
    monkeypatch.setattr(peak, "matmul_gflops", lambda dtype, *a: timed.append(dtype) or real_mm(dtype, *a))
    monkeypatch.setattr(peak, "fp32_flop_bound", lambda w, d, dtype: timed.append(dtype) or real_bound(w, d, dtype))
    rates = peak.gemm_rates(width=32, square=64)
    assert rates["bound_fp32"] > 0
    if skipped is None:
        assert rates["bf16_skipped"] is None and rates["bound_bf16"] >= rates["mm_bf16"] > 0
        assert torch.bfloat16 in timed
    else:
        assert torch.bfloat16 not in timed
        assert rates["mm_bf16"] is None and rates["bound_bf16"] is None
        assert skipped in rates["bf16_skipped"]
        text = report.render_markdown({"peak": {"physical": {}, "gemm": rates}})
        assert text.count(skipped) == 2


def test_the_bf16_note_says_when_the_amx_part_did_not_run() -> None:
    both = {"avx512_bf16", "amx_bf16", "amx_tile"}
    assert peak.bf16_note(both).startswith("the faster of vdpbf16ps")
    refused = peak.bf16_note(both, "the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    assert "faster" not in refused and "not AMX: the kernel refused AMX tile data" in refused
    assert "no bf16 dot-product instructions" in peak.bf16_note({"avx2"})


@pytest.mark.parametrize(("onednn_bf16", "flags", "why"), BF16_CPUS)
def test_the_bf16_section_runs_where_onednn_has_bf16_and_the_cpu_has_dot_products(
        onednn_bf16: bool, flags: set[str], why: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "onednn_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(peak, "cpu_flags", lambda cpuinfo=None: flags)
    reason = bf16_runnable(Run(args=None, device="cpu"))  # type: ignore[arg-type]
    assert (reason is None) if why is None else (why in (reason or "")), reason


def test_without_gcc_the_peak_says_so_and_no_ratio_to_it_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peak.shutil, "which", lambda name: None)
    measured = peak.physical_peak(threads=2, cpuinfo=CPUINFO)
    assert measured["measured"] is False and "gcc not found" in measured["reason"]
    assert measured["fp32_gflops"] is None
    bounds = bounds_of({"physical": measured, "gemm": {"bound_fp32": 400.0}}, "cpu")
    rows = [{"detector": "winclip", "setting": "0-shot", "gflops": 300.0}]
    add_ratios(rows, bounds)
    assert rows[0]["ratio_peak"] is None and rows[0]["ratio_gemm"] == pytest.approx(0.75)
    text = report.render_markdown({"meta": {"mode": "quick"}, "peak": {"physical": measured, "gemm": {}}})
    assert "gcc not found" in text


def test_cpu_facts_from_cpuinfo() -> None:
    flags = peak.cpu_flags(CPUINFO)
    assert peak.cpu_model(CPUINFO) == "Intel(R) Xeon(R) Platinum 8481C (family 6, model 143)"
    amd = "vendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n"
    assert peak.cpu_model(amd.format(25, 17)) == "AMD EPYC (family 25, model 17, Zen 4)"
    assert peak.cpu_model(amd.format(26, 2)) == "AMD EPYC (family 26, model 2, Zen 5)"
    assert peak.cpu_model(amd.format(25, 1)) == "AMD EPYC (family 25, model 1, Zen 3)"
    assert peak.cpu_model(amd.format(25, 0x90)) == "AMD EPYC (family 25, model 144, Zen 4)"
    assert peak.cpu_model(amd.format(23, 0x50)) == "AMD EPYC (family 23, model 80, Zen / Zen+)"
    assert peak.cpu_model(amd.format(25, 0xF0)) == "AMD EPYC (family 25, model 240)"  # unknown: no guess
    assert peak.kernel_isa(flags) == "avx512"
    assert peak.kernel_isa({"avx2", "fma"}) == "avx2"
    assert peak.kernel_isa({"avx"}) is None
    assert "-mno-avx512f" in peak.compile_flags({"avx2", "fma"})
    assert "-mno-avx512f" not in peak.compile_flags(flags)
    assert "AMX" in peak.bf16_note(flags) and "vdpbf16ps" in peak.bf16_note(flags)
    assert "AMX" not in peak.bf16_note({"avx512_bf16"}) and "AMX" in peak.bf16_note({"amx_bf16", "amx_tile"})
    assert peak.bf16_note({"avx2"}).startswith("not measured")


# ---------------------------------------------------------------------------------------------- FLOP counting
def test_counted_flops_cover_matmuls_onednn_linears_and_cpu_attention() -> None:
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert counted_flops(lambda: torch.mm(a, b))[0] == 2 * 64 * 32 * 16
    q = k = v = torch.randn(2, 4, 10, 8)
    total, per_op = counted_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == 4 * 2 * 4 * 10 * 10 * 8, per_op
    from inspectd.detectors import fused

    if fused.available():
        weight = torch.randn(16, 32)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        total, _ = counted_flops(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
        assert total == 2 * 64 * 32 * 16


def test_analytic_forward_flops_equal_the_counted_ones(tiny_backbone: object) -> None:
    """bench/common.py's formulas (bench/backbone.py and bench/winclip.py rate against them) against what the
    fused tower executes: the plain forward, the CLS-only forward and the window passes."""
    from bench.common import vit_forward_flops, window_pass_flops
    from inspectd.detectors.backbone import FeatureRequest

    backbone = tiny_backbone
    assert backbone.fused_blocks is not None
    grid, patch, width = backbone.grid[0], backbone.patch_size, backbone.width
    layers, embed = len(backbone.visual.transformer.resblocks), backbone.embed_dim
    pixels = torch.randn(1, 3, backbone.image_size, backbone.image_size)

    def counted(request: FeatureRequest) -> float:
        return counted_flops(lambda: backbone.forward(pixels, request))[0]

    full = vit_forward_flops(grid, patch, width, layers, embed)
    assert counted(FeatureRequest(patch_embeddings=True)) == pytest.approx(full + 2 * grid * grid * width * embed)
    assert counted(FeatureRequest()) == pytest.approx(vit_forward_flops(grid, patch, width, layers, embed, True))
    assert counted(FeatureRequest(windows=frozenset({2}))) == pytest.approx(
        vit_forward_flops(grid, patch, width, layers, embed, True) + window_pass_flops(grid, 2, width, layers, embed,
                                                                                      True))


def test_kernel_kinds_from_profiler_and_flop_counter_names() -> None:
    for name in ("aten::mm", "aten.mm.default", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
                 "mkldnn._linear_pointwise.binary"):
        assert breakdown.kind_of(name) == "gemm", name
    for name in ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten.scaled_dot_product_attention",
                 "LlgaPartition_0"):
        assert breakdown.kind_of(name) == "attention", name
    for name in ("aten::mkldnn_convolution", "aten.convolution.default"):
        assert breakdown.kind_of(name) == "conv", name
    for name in ("aten::native_layer_norm", "aten::copy_", "aten::mm_like_but_not", "aten::matmul"):
        assert breakdown.kind_of(name) == "other", name


def test_breakdown_splits_a_real_batch_by_kernel_kind_and_rates_each_kind() -> None:
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    q = k = v = torch.randn(2, 4, 64, 32)
    x = torch.randn(4096, 512)

    def call() -> None:
        torch.mm(a, b)
        F.scaled_dot_product_attention(q, k, v)
        x.mul(2.0).add_(1.0).relu_()

    _, per_op = counted_flops(call)
    split = breakdown.breakdown(call, per_op)
    assert set(split) == set(breakdown.KINDS)
    assert sum(part["share"] for part in split.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(split[kind]["share"] > 0 for kind in ("gemm", "attention", "other"))
    assert split["conv"]["share"] == 0 and split["conv"]["gflops"] is None
    assert split["other"]["gflops"] is None  # element-wise work is not counted
    assert split["attention"]["gflops"] > 0 and 0 < split["gemm"]["gflops"] < 1e5


# ---------------------------------------------------------------------------------------------- rendering
def small_results() -> dict:
    rows = [{"detector": "winclip", "setting": "0-shot", "fit_s": 0.1, "images_per_s": 0.5, "ms_per_image": 2000.0,
             "gflop_per_image": 636.4, "gflops": 318.2},
            {"detector": "promptad", "setting": "0-shot", "skipped": "learns its prompts from k >= 1 references"},
            {"detector": "aprilgan", "setting": "4-shot", "fit_s": 1.0, "images_per_s": 6.0, "ms_per_image": 166.0,
             "gflop_per_image": 60.0, "gflops": 460.0,
             "time_by_kind": {"gemm": {"share": 0.8, "gflops": 450.0}, "attention": {"share": 0.12, "gflops": 150.0},
                              "conv": {"share": 0.0, "gflops": None}, "other": {"share": 0.08, "gflops": None}}}]
    bf16_rows = [{"detector": "winclip", "setting": "0-shot", "fit_s": 0.1, "images_per_s": 0.9, "ms_per_image": 1111.0,
                  "gflop_per_image": 636.4, "gflops": 572.8, "speedup_vs_fp32": 1.8}]
    results = {
        "meta": {"mode": "quick", "cpu": "Test CPU", "wall_s": 12.5},
        "peak": {"physical": {"measured": True, "isa": "avx512", "threads": 2, "fp32_gflops": 500.0,
                              "fp32_gflops_1thread": 250.0, "bf16_gflops": 1000.0, "bf16_note": "vdpbf16ps",
                              "build": "gcc 12 -O2 -march=native"},
                 "gemm": {"mm_fp32": 200.0, "mm_bf16": 800.0, "bound_fp32": 480.0, "bound_bf16": 950.0,
                          "square": 2048.0, "width": 896.0}},
        "detectors": {"rows": rows, "fits": [{"detector": "promptad", "what": "fit k=4, 5 steps", "value": 3.0,
                                              "unit": "s"}], "model": "ViT-B-16-plus-240"},
        "daemon": {"rows": [{"arch": "inspectd-tiny", "batch": 1, "engine": 80.0, "e2e": 60.0, "mean_batch": 1.0,
                             "p50@50%": 14.0, "p99@50%": 20.0, "p50@90%": 15.0, "p99@90%": float("nan")},
                            {"arch": "inspectd-tiny", "batch": 4, "engine": 100.0, "e2e": 97.0, "mean_batch": 4.0,
                             "p50@50%": 20.0, "p99@50%": 30.0, "p50@90%": 100.0, "p99@90%": 200.0}]},
        "sweeps": {"model": "inspectd-tiny", "batch": [{"batch": 1, "images_per_s": 100.0, "ms_per_image": 10.0}],
                   "memory": [{"k": 4, "memory_entries": 2360, "images_per_s": 90.0, "ms_per_image": 11.0,
                               "nn_ms_per_image": 1.0}],
                   "frame_size": [{"frame": "4K", "width": 3840, "height": 2160, "jpeg_bytes": 500000, "tiles": 2,
                                   "decode_ms": 20.0, "preprocess_ms": 80.0, "score_ms": 30.0, "total_ms": 130.0}]},
        "bf16": {"rows": bf16_rows, "accuracy": [{"setting": "0-shot", "images": 2, "max_abs_score_diff": 1e-3,
                                                  "max_abs_map_diff": 2e-3, "fp32_score_range": [0.3, 0.33],
                                                  "fp32_map_range": [0.28, 0.35]}]},
        "compile": {"rows": [{"mode": "off", "kernels": "onednn", "images_per_s": 170.0, "speedup_vs_off": 1.0,
                              "first_batch_s": 0.1, "max_abs_score_diff": 0.0, "max_abs_map_diff": 0.0},
                             {"mode": "default", "kernels": "inductor:default", "images_per_s": 85.0,
                              "speedup_vs_off": 0.5, "first_batch_s": 3.9, "max_abs_score_diff": 3e-8,
                              "max_abs_map_diff": 1.5e-7}], "model": "tiny", "frames": "WinCLIP 0-shot"},
        "gpu": gpu.gpu_section("cpu"),
        "memory": {"peak_rss_mib": 2048.0, "rss_after": {"detectors": 2000.0}, "gpu": gpu.peak_memory("cpu")},
        "broken": {"error": "never rendered: not a known section"},
    }
    bounds = bounds_of(results["peak"], "cpu")
    results["meta"]["bounds"] = bounds
    add_ratios(rows, bounds)
    add_ratios(bf16_rows, bounds)
    results["targets"] = report.evaluate_targets(results)
    return results


def test_markdown_has_every_section_and_the_gpu_note() -> None:
    text = report.render_markdown(small_results())
    for title in ("## 1. Physical peak", "## 2. Detectors", "## 3. Daemon", "## 4. Memory", "## 5. Cost growth",
                  "## 6. bf16", "## 7. torch.compile", "## 8. GPU", "## Targets"):
        assert title in text
    assert "GPU: not measured (no CUDA device)" in text
    assert "not measured: no GPU" in text
    assert "not applicable: learns its prompts" in text
    assert "| winclip | 0-shot | 0.10 | 0.50 | 2 000 | 636.4 | 318.2 | 0.66 | 0.64 |" in text
    assert "never rendered" not in text
    assert "| default | inductor:default | 85.00 | 0.50 | 3.90 | 3.0e-08 |" in text
    assert "| aprilgan | 4-shot | 80.0 % at 450 GFLOP/s, 0.90 of peak | 12.0 % at 150 GFLOP/s, 0.30 of peak | 0.0 % |" \
           " 8.0 % |" in text


def test_a_failed_section_shows_its_error() -> None:
    text = report.render_markdown({"meta": {}, "daemon": {"error": "ConnectionError: no Redis"}})
    assert "Not measured: ConnectionError: no Redis" in text


def test_json_is_valid_and_has_no_nan(tmp_path: Path) -> None:
    results = small_results()
    markdown, data = report.write_report(results, tmp_path / "out")
    assert markdown == tmp_path / "out" / "report.md" and markdown.read_text().startswith("# inspectd benchmark")
    loaded = json.loads(data.read_text())
    assert loaded["daemon"]["rows"][0]["p99@90%"] is None
    assert loaded["detectors"]["rows"][0]["ratio_peak"] == pytest.approx(318.2 / 500)
    assert report.output_paths(tmp_path / "r.md") == (tmp_path / "r.md", tmp_path / "r.json")


def test_targets_are_judged_from_the_numbers() -> None:
    targets = {t["target"].split(" ")[0]: t for t in small_results()["targets"]}
    assert targets["every"]["met"] is False  # 0.64 and 0.92 of the peak; the lowest decides
    assert "winclip 0-shot" in targets["every"]["measured"]
    assert targets["bf16"]["met"] is True and "0.57" in targets["bf16"]["measured"]
    assert targets["end-to-end"]["met"] is True  # only batch >= 4 counts: 0.97
    results = small_results()
    results["daemon"]["rows"][1]["e2e"] = 90.0
    assert report.evaluate_targets(results)[2]["met"] is False
    results["daemon"]["rows"][1]["ratio"] = 0.96  # the adjacent pairs' median decides where a run kept it
    assert report.evaluate_targets(results)[2]["met"] is True and "0.96" in report.evaluate_targets(results)[2][
        "measured"]
    assert all(t["met"] is None for t in report.evaluate_targets({}))


def test_fmt_cells() -> None:
    assert report.fmt(None) == "—" and report.fmt(float("inf")) == "—"
    assert report.fmt(1234.5) == "1 234" and report.fmt(123.45) == "123.5" and report.fmt(0.5) == "0.50"
    assert report.fmt(0.0004) == "4.0e-04" and report.fmt(3) == "3" and report.fmt(True) == "yes"


# ---------------------------------------------------------------------------------------------- command line
def test_help_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.run", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout and "--device" in done.stdout


def test_arguments() -> None:
    args = parse_args(["--quick", "--out", "x.md", "--sections", "peak", "gpu"])
    assert args.quick and args.out == "x.md" and args.sections == ["peak", "gpu"]
    assert parse_args([]).sections == ["peak", "detectors", "daemon", "sweeps", "bf16", "compile", "gpu"]


def test_ceilings_keep_the_higher_of_start_and_end() -> None:
    first = {"physical": {"fp32_gflops": 500.0, "isa": "avx512"}, "gemm": {"bound_fp32": 450.0, "width": 896.0}}
    second = {"physical": {"fp32_gflops": 510.0, "isa": "avx512"}, "gemm": {"bound_fp32": 440.0, "width": 896.0}}
    merged = merge_ceilings(first, second)
    assert merged["physical"]["fp32_gflops"] == 510.0 and merged["physical"]["fp32_gflops_start"] == 500.0
    assert merged["gemm"]["bound_fp32"] == 450.0 and merged["gemm"]["bound_fp32_end"] == 440.0
    assert "width_start" not in merged["gemm"]
    assert first["physical"]["fp32_gflops"] == 500.0  # inputs untouched


# ---------------------------------------------------------------------------------------------- CUDA path logic
def test_device_choice() -> None:
    assert gpu.choose_device("auto", has_cuda=False) == "cpu"
    assert gpu.choose_device("auto", has_cuda=True) == "cuda"
    assert gpu.choose_device("cpu", has_cuda=True) == "cpu"
    assert gpu.choose_device("cuda:1", has_cuda=True) == "cuda:1"
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu.choose_device("cuda", has_cuda=False)
    with pytest.raises(ValueError, match="--device must be"):
        gpu.choose_device("tpu", has_cuda=True)


def test_half_precision_choice() -> None:
    assert gpu.half_dtype("cpu") is None
    assert gpu.half_dtype("cuda", bf16_supported=True) is torch.bfloat16
    assert gpu.half_dtype("cuda:0", bf16_supported=False) is torch.float16
    assert [gpu.precision_name(d) for d in (None, torch.float32, torch.bfloat16, torch.float16)] == [
        "fp32", "fp32", "bf16", "fp16"]


def test_cpu_side_of_the_cuda_path_is_a_no_op() -> None:
    x = torch.randn(4, 4)
    with gpu.autocast("cpu", torch.bfloat16):
        assert (x @ x).dtype is torch.float32  # no CPU autocast: bf16 on a CPU is its own, explicit row
    gpu.synchronizer("cpu")()
    gpu.reset_peak_memory("cpu")
    calls = []
    seconds = gpu.timed_best(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and 0 <= seconds < 1
    assert gpu.peak_memory("cpu") == {"measured": False, "note": "not measured: no GPU"}
    assert gpu.gpu_section("cpu") == {"measured": False, "note": "not measured (no CUDA device)"}


def test_gpu_rows_rate_against_the_tensor_core_peak_not_the_cpu() -> None:
    ceilings = {"physical": {"fp32_gflops": 500.0, "bf16_gflops": 1000.0},
                "gemm": {"bound_fp32": 700_000.0, "bound_bf16": 700_000.0}}
    bounds = bounds_of(ceilings, "cuda")
    assert bounds["peak"] is None and bounds["bf16_peak"] is None and bounds["gemm"] == 700_000.0
    assert bounds_of(ceilings, "cpu")["peak"] == 500.0


def test_gpu_runs_time_micro_batches_and_the_vit_daemon_at_gpu_rates() -> None:
    from bench.detectors import Plan
    from bench.run import daemon_plan

    assert Plan.make(True, "cuda").batch == 32 and Plan.make(False, "cuda:0").batch == 64
    assert Plan.make(True, "cpu").batch == 2 and Plan.make(False).batch == 4
    assert daemon_plan("ViT-B-16-plus-240", True, "cuda") == (1024, (32,))
    assert daemon_plan("ViT-B-16-plus-240", False, "cuda")[1] == (16, 32, 64)
    assert daemon_plan("ViT-B-16-plus-240", True, "cpu") == (16, (4,))
    assert daemon_plan("inspectd-tiny", True, "cpu") == (128, (1, 4, 16))
    assert daemon_plan("inspectd-tiny", True, "cuda") == (1024, (1, 4, 16))


def test_a_gpu_run_adds_one_camera_row_at_the_vits_batch_limit() -> None:
    from bench.run import daemon_rows

    archs = ["inspectd-tiny", "ViT-B-16-plus-240"]
    assert daemon_rows(archs, True, "cpu") == [("inspectd-tiny", 128, 1, False), ("inspectd-tiny", 128, 4, False),
                                               ("inspectd-tiny", 128, 16, False), ("ViT-B-16-plus-240", 16, 4, False)]
    gpu_rows = daemon_rows(archs, True, "cuda")
    assert gpu_rows[-1] == ("ViT-B-16-plus-240", 1024, 32, True)  # 1080p JPEGs: can decode keep up?
    assert [r for r in gpu_rows if r[3]] == gpu_rows[-1:]


def test_gpu_targets_are_judged_on_a_gpu_run_and_say_not_measured_elsewhere() -> None:
    cpu = report.gpu_targets(small_results())
    assert [t["met"] for t in cpu] == [None, None] and all("no CUDA device" in t["measured"] for t in cpu)
    results = {"meta": {"device": "cuda"},
               "detectors": {"rows": [{"detector": "winclip", "setting": "0-shot", "images_per_s": 800.0,
                                       "ratio_gemm": 0.54}]},
               "daemon": {"rows": [{"arch": "inspectd-tiny", "batch": 4, "engine": 900.0, "e2e": 500.0},
                                   {"arch": "ViT-B-16-plus-240", "batch": 32, "engine": 800.0, "e2e": 760.0,
                                    "p99@50%": 61.0}]}}
    winclip, daemon = report.gpu_targets(results)
    assert winclip["met"] is True and "800 images/s = 0.54" in winclip["measured"]
    assert daemon["met"] is True and "0.95 at 800 images/s" in daemon["measured"] and "p99 61" in daemon["measured"]
    results["daemon"]["rows"][1]["e2e"] = 700.0
    results["detectors"]["rows"][0]["ratio_gemm"] = 0.4
    assert [t["met"] for t in report.gpu_targets(results)] == [False, False]
    assert [t["target"][:4] for t in report.evaluate_targets(results)][-2:] == ["GPU:", "GPU:"]
    assert "GPU: micro-batched WinCLIP" in report.render_markdown(small_results())  # "not measured" rows shown


def test_gpu_section_renders_when_measured() -> None:
    text = report.render_markdown({"meta": {}, "gpu": {"measured": True, "name": "Test GPU",
                                                       "tensor_core_bf16_gflops": 700_000.0}})
    assert "Test GPU" in text and "700 000" in text and "not measured" not in text.split("## 8. GPU")[1]


def test_peak_takes_one_thread_times_threads_when_the_all_thread_run_was_crowded() -> None:
    crowded = peak.peak_of({"fp32_gflops": 270.0, "fp32_gflops_1thread": 260.0, "bf16_gflops": None}, threads=2)
    assert crowded == {"fp32_gflops_all_threads": 270.0, "fp32_gflops": 520.0, "fp32_basis": "1 thread x 2"}
    quiet = peak.peak_of({"fp32_gflops": 515.0, "fp32_gflops_1thread": 257.0, "bf16_gflops": 1030.0,
                          "bf16_gflops_1thread": 520.0}, threads=2)
    assert quiet["fp32_gflops"] == 515.0 and quiet["fp32_basis"] == "all threads"
    assert quiet["bf16_gflops"] == 1040.0 and quiet["bf16_basis"] == "1 thread x 2"
    tiles = peak.peak_of({"fp32_gflops": 490.0, "bf16_gflops": 246.0, "bf16_isa": "avx512_bf16 vdpbf16ps",
                          "amx_bf16_gflops": 7000.0, "amx_bf16_gflops_1thread": 3800.0}, threads=2)
    assert tiles["bf16_gflops"] == 7600.0 and tiles["bf16_isa"] == "amx_bf16 tdpbf16ps"
    assert tiles["bf16_gflops_1thread"] == 3800.0 and tiles["bf16_basis"] == "1 thread x 2"
    assert tiles["dot_bf16_gflops"] == 246.0 and tiles["dot_bf16_isa"] == "avx512_bf16 vdpbf16ps"
    assert "bf16_isa" not in quiet  # no AMX figure: the vector peak stands, named by the kernel's own bf16_isa


def test_best_times_interleaves_and_keeps_each_best() -> None:
    from bench.common import best_times

    calls: list[str] = []
    best = best_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up, then three rounds, in turn
    assert set(best) == {"a", "b"} and all(0 <= t < 1 for t in best.values())


def test_decode_pool_bench_prepares_every_frame_size_both_ways() -> None:
    import asyncio

    from bench import decode_pool

    rows = asyncio.run(decode_pool.measure(threads=2, n=2, rounds=1))
    assert [r["frame"] for r in rows] == ["240 px", "512 px", "1080p", "4K"]
    for row in rows:
        assert row["one torch thread per worker"] > 0 and row["torch's thread count per worker"] > 0


def test_daemon_rows_name_their_frames() -> None:
    results = small_results()
    camera = dict(results["daemon"]["rows"][1], arch="ViT-B-16-plus-240", input="1080p JPEG, model.resize fast")
    results["daemon"]["rows"].append(camera)
    text = report.render_markdown(results)
    assert "| inspectd-tiny | 240-px PNG | 4 |" in text
    assert "| ViT-B-16-plus-240 | 1080p JPEG, model.resize fast | 4 |" in text


def test_daemon_rows_show_the_spread_of_their_pairs() -> None:
    results = small_results()
    results["daemon"]["rows"][1]["ratio_range"] = [0.81, 1.04]
    text = report.render_markdown(results)
    assert "pairs' range" in text and "| 0.81–1.04 |" in text
    first_row = next(line for line in text.splitlines() if line.startswith("| inspectd-tiny | 240-px PNG | 1 |"))
    assert first_row.split("|")[7].strip() == "—"  # a row of a report written before the range was kept
