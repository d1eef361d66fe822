"""Rendering of the benchmark report (bench/run.py's results dict): the Markdown tables, the JSON file, and the
check of the issue's targets against the measured numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PEAK_TARGET = 0.85  # every detector's forward >= 0.85 of the physical fp32 peak
E2E_TARGET = 0.95  # end-to-end >= 0.95 of engine-only at saturation, batch limit >= 4
GPU_WINCLIP_TARGET = 0.5  # on a GPU: micro-batched WinCLIP 0-shot >= 0.5 of the dense bf16 tensor-core bound
GPU_E2E_TARGET = 0.9  # on a GPU: the daemon end-to-end >= 0.9 of engine-only at that rate (ViT)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers with ``digits`` decimals (large ones with fewer), "—" for missing values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}".replace(",", " ")
        if abs(value) >= 100:
            return f"{value:.1f}"
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, tuples lists, paths strings."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(clean(results), indent=2, allow_nan=False)


def e2e_ratio(row: dict[str, Any]) -> float:
    """A daemon row's end-to-end / engine-only: the median of its adjacent pairs' ratios (bench/daemon.py), or the
    ratio of its two rates in reports written before the pairs were kept."""
    return row["ratio"] if row.get("ratio") is not None else row["e2e"] / row["engine"]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met (None: could not be judged)."""
    targets = []
    rows = [r for r in results.get("detectors", {}).get("rows", []) if "gflops" in r]
    ratios = [r.get("ratio_peak") for r in rows]
    if rows and all(x is not None for x in ratios):
        worst = min(rows, key=lambda r: r["ratio_peak"])
        targets.append({"target": f"every detector's forward >= {PEAK_TARGET} of the physical fp32 peak",
                        "measured": f"{min(ratios):.2f}-{max(ratios):.2f} (lowest: {worst['detector']} "
                                    f"{worst['setting']})",
                        "met": min(ratios) >= PEAK_TARGET})
    else:
        targets.append({"target": f"every detector's forward >= {PEAK_TARGET} of the physical fp32 peak",
                        "measured": "not measured (no detector rows or no physical peak)", "met": None})
    bf16 = results.get("bf16", {})
    bf16_rows = [r for r in bf16.get("rows", []) if r.get("ratio_bf16_peak") is not None]
    if bf16_rows and bf16.get("accuracy"):
        worst_score = max(a["max_abs_score_diff"] for a in bf16["accuracy"])
        worst_map = max(a["max_abs_map_diff"] for a in bf16["accuracy"])
        measured = (f"{min(r['ratio_bf16_peak'] for r in bf16_rows):.2f}-"
                    f"{max(r['ratio_bf16_peak'] for r in bf16_rows):.2f} of the bf16 peak; max abs score diff "
                    f"{worst_score:.2g}, max abs map diff {worst_map:.2g} (vs fp32)")
        targets.append({"target": "bf16 measured against the bf16 peak, with its accuracy cost", "measured": measured,
                        "met": True})
    elif bf16.get("rows") and bf16.get("accuracy"):
        targets.append({"target": "bf16 measured against the bf16 peak, with its accuracy cost",
                        "measured": "rate and accuracy measured, but no bf16 peak to rate against", "met": None})
    else:
        targets.append({"target": "bf16 measured against the bf16 peak, with its accuracy cost",
                        "measured": bf16.get("note") or bf16.get("error") or "not measured",
                        "met": False if bf16.get("error") else None})
    daemon = [r for r in results.get("daemon", {}).get("rows", []) if r.get("batch", 0) >= 4]
    if daemon:
        ratios = [e2e_ratio(r) for r in daemon]
        targets.append({"target": f"end-to-end >= {E2E_TARGET} of engine-only at saturation, batch limit >= 4",
                        "measured": ", ".join(f"{e2e_ratio(r):.2f} (batch {r['batch']}, {r['arch']})"
                                              for r in daemon),
                        "met": min(ratios) >= E2E_TARGET})
    else:
        targets.append({"target": f"end-to-end >= {E2E_TARGET} of engine-only at saturation, batch limit >= 4",
                        "measured": "not measured", "met": None})
    return targets + gpu_targets(results)


def gpu_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU targets: micro-batched WinCLIP zero-shot against the tensor-core bound (the GEMM bound of a GPU run),
    the ViT daemon end-to-end against engine-only at that rate, and its p99 latency at 50 % load."""
    names = [f"GPU: micro-batched WinCLIP 0-shot >= {GPU_WINCLIP_TARGET} of the dense bf16 tensor-core bound",
             f"GPU: daemon end-to-end >= {GPU_E2E_TARGET} of engine-only at that rate (ViT), p99 at 50 % load"]
    if not str(results.get("meta", {}).get("device", "cpu")).startswith("cuda"):
        return [{"target": name, "measured": "not measured (no CUDA device)", "met": None} for name in names]
    out = []
    winclip = [r for r in results.get("detectors", {}).get("rows", [])
               if r.get("detector") == "winclip" and r.get("setting") == "0-shot" and r.get("ratio_gemm") is not None]
    out.append({"target": names[0], "met": winclip[0]["ratio_gemm"] >= GPU_WINCLIP_TARGET if winclip else None,
                "measured": f"{winclip[0]['images_per_s']:.0f} images/s = {winclip[0]['ratio_gemm']:.2f} of the bound"
                            if winclip else "not measured"})
    vit = [r for r in results.get("daemon", {}).get("rows", []) if r.get("arch") != "inspectd-tiny"]
    out.append({"target": names[1], "met": min(e2e_ratio(r) for r in vit) >= GPU_E2E_TARGET if vit else None,
                "measured": ", ".join(f"{e2e_ratio(r):.2f} at {r['engine']:.0f} images/s engine-only "
                                      f"(batch {r['batch']}), p99 {fmt(r.get('p99@50%'))} ms" for r in vit)
                            or "not measured"})
    return out


def _inline(value: Any) -> Any:
    """A dict as "key value, ..." in one cell (rates to one decimal)."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v, 1)}" for k, v in value.items())
    return value


def _met(value: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not judged"}[value]


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown, one section per measurement; sections missing from ``results`` are skipped,
    sections that failed show their error."""
    meta = results.get("meta", {})
    out = [f"# inspectd benchmark report ({meta.get('mode', '?')})", ""]
    out.append(table(["what", "value"], [[k.replace("_", " "), _inline(v)] for k, v in meta.items()]))
    out.append("")
    out.append("Random (seeded) CLIP weights: timing only, the scores mean nothing. Ratios are to bounds measured "
               "in this same run.")
    for title, key, render in SECTIONS:
        if key not in results:
            continue
        out += ["", f"## {title}", ""]
        section = results[key]
        if isinstance(section, dict) and section.get("error"):
            out.append(f"Not measured: {section['error']}")
            continue
        out.append(render(section, results))
    timing = [[name, section.get("seconds"), " – ".join(fmt(x) for x in section.get("load_average", []))]
              for name, section in results.items() if isinstance(section, dict) and "seconds" in section]
    if timing:
        out += ["", "## Run", "", "Seconds per section and the 1-minute load average before and after it (above the "
                "core count: other processes shared the cores, and single figures are noisy).", "",
                table(["section", "seconds", "load average"], timing)]
    out += ["", "## Targets", ""]
    out.append(table(["target", "measured", "status"],
                     [[t["target"], t["measured"], _met(t["met"])] for t in results.get("targets", [])]))
    return "\n".join(out) + "\n"


def _peak(section: dict[str, Any], results: dict[str, Any]) -> str:
    peak, gemm = section.get("physical", {}), section.get("gemm", {})
    rows = []
    if peak.get("measured"):
        rows.append([f"physical fp32 FMA peak ({peak['isa']}, {peak['threads']} threads)", peak["fp32_gflops"],
                     f"bench/fma_peak.c built with {peak.get('build', '')}; {_basis(peak, 'fp32')}"])
        bf16_how = peak.get("bf16_note", "")
        if peak.get("bf16_gflops"):
            bf16_how += f"; {_basis(peak, 'bf16')}"
        if peak.get("dot_bf16_gflops"):
            bf16_how += f"; vdpbf16ps alone: {peak['dot_bf16_gflops']:.0f} GFLOP/s"
        isa = f" ({peak['bf16_isa']})" if peak.get("bf16_isa") else ""
        rows.append([f"physical bf16 peak{isa}", peak.get("bf16_gflops"), bf16_how])
    else:
        rows.append(["physical fp32 FMA peak", None, peak.get("reason", "not measured")])
    if gemm:
        rows.append([f"torch.mm fp32 {int(gemm.get('square', 2048))}^3", gemm.get("mm_fp32"), "MKL on CPU"])
        rows.append([f"torch.mm bf16 {int(gemm.get('square', 2048))}^3", gemm.get("mm_bf16"),
                     gemm.get("bf16_skipped") or ""])
        rows.append(["GEMM bound fp32 (best kernel and shape)", gemm.get("bound_fp32"),
                     "what bench/common.py's fp32_flop_bound rates against: MKL and prepacked oneDNN, square and the "
                     f"ViT's shapes (width {int(gemm.get('width', 0))})"])
        rows.append(["GEMM bound bf16", gemm.get("bound_bf16"), gemm.get("bf16_skipped") or ""])
    text = table(["ceiling", "GFLOP/s", "how"], rows)
    if peak.get("measured") and gemm.get("bound_fp32"):
        text += (f"\n\nThe fp32 GEMM bound is {gemm['bound_fp32'] / peak['fp32_gflops']:.2f} of the physical fp32 "
                 "peak.")
    notes = section.get("notes", [])
    return text + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def _basis(peak: dict[str, Any], kind: str) -> str:
    return (f"taken from {peak.get(f'{kind}_basis', 'all threads')} (all threads measured "
            f"{fmt(peak.get(f'{kind}_gflops_all_threads'))}, 1 thread {fmt(peak.get(f'{kind}_gflops_1thread'))})")


def _detectors(section: dict[str, Any], results: dict[str, Any]) -> str:
    rows = []
    for r in section.get("rows", []):
        if "skipped" in r:
            rows.append([r["detector"], r["setting"], None, None, None, None, None, None, None,
                         f"not applicable: {r['skipped']}"])
            continue
        rows.append([r["detector"], r["setting"], r.get("fit_s"), r["images_per_s"], r["ms_per_image"],
                     r["gflop_per_image"], r["gflops"], r.get("ratio_gemm"), r.get("ratio_peak"), ""])
    text = (f"Model: {section.get('model', '?')}; {section.get('frames', '')}\n\n"
            + table(["detector", "setting", "product fit s", "images/s", "ms/image", "GFLOP/img", "GFLOP/s",
                     "ratio to GEMM bound", "ratio to physical peak", "note"], rows))
    text += _time_by_kind(section, results)
    fits = section.get("fits", [])
    if fits:
        text += "\n\nLearned parts and per-product fits (short schedules, stated):\n\n"
        text += table(["detector", "what", "value", "unit"], [[f["detector"], f["what"], f["value"], f["unit"]]
                                                              for f in fits])
    return text


def _time_by_kind(section: dict[str, Any], results: dict[str, Any]) -> str:
    """The per-kind split of each detector's time (bench/breakdown.py): share of the wall time and the kind's
    GFLOP/s with its ratio to the physical peak."""
    rows = [r for r in section.get("rows", []) if r.get("time_by_kind")]
    if not rows:
        return ""
    peak = (results.get("meta", {}).get("bounds") or {}).get("peak")

    def cell(part: dict[str, Any]) -> str:
        rate = part.get("gflops")
        if rate is None:
            return fmt(100 * part["share"], 1) + " %"
        ratio = f", {rate / peak:.2f} of peak" if peak else ""
        return f"{100 * part['share']:.1f} % at {rate:.0f} GFLOP/s{ratio}"

    body = [[r["detector"], r["setting"], *(cell(r["time_by_kind"][k]) for k in ("gemm", "attention", "conv")),
             fmt(100 * r["time_by_kind"]["other"]["share"], 1) + " %"] for r in rows]
    return ("\n\nWhere the time goes (one batch per setting under torch.profiler, after the timed rounds' warm-up: "
            "share of its wall time, and each kind's counted FLOPs over its own time; \"other\" is what no GEMM, "
            "attention or convolution kernel took: element-wise ops, copies, Python):\n\n"
            + table(["detector", "setting", "GEMMs (oneDNN linears, mm, bmm)", "attention (SDPA)", "convolution",
                     "other"], body))


def _daemon(section: dict[str, Any], results: dict[str, Any]) -> str:
    rows = [[r["arch"], r.get("input", "240-px PNG"), r["batch"], r["engine"], r["e2e"], e2e_ratio(r),
             "–".join(f"{x:.2f}" for x in r["ratio_range"]) if r.get("ratio_range") else "—", r["mean_batch"],
             r.get("p50@50%"), r.get("p99@50%"), r.get("p50@90%"), r.get("p99@90%")]
            for r in section.get("rows", [])]
    return (f"{section.get('how', '')}\n\n"
            + table(["model", "frames", "batch limit", "engine img/s", "end-to-end img/s",
                     "e2e / engine (pairs' median)", "pairs' range", "mean batch", "p50 ms @ 50 %", "p99 ms @ 50 %",
                     "p50 ms @ 90 %", "p99 ms @ 90 %"], rows))


def _memory(section: dict[str, Any], results: dict[str, Any]) -> str:
    rows = [["peak RSS (ru_maxrss)", f"{fmt(section.get('peak_rss_mib'))} MiB"]]
    rows += [[f"peak RSS after {name}", f"{fmt(mib)} MiB"] for name, mib in section.get("rss_after", {}).items()]
    gpu = section.get("gpu", {})
    if gpu.get("measured"):
        rows.append(["peak GPU memory (max_memory_allocated)", f"{gpu['max_allocated_bytes'] / 2 ** 20:.0f} MiB"])
        rows.append(["peak GPU memory reserved", f"{gpu['max_reserved_bytes'] / 2 ** 20:.0f} MiB"])
    else:
        rows.append(["peak GPU memory", gpu.get("note", "not measured: no GPU")])
    return table(["what", "value"], rows)


def _sweeps(section: dict[str, Any], results: dict[str, Any]) -> str:
    parts = [f"Model: {section.get('model', '?')}; detector: {section.get('detector', '')}; best of "
             f"{section.get('repeats', '?')} rounds that time every point of every sweep in turn."]
    if section.get("batch"):
        parts += ["", "Batch size:", "", table(["batch", "images/s", "ms/image"],
                                              [[r["batch"], r["images_per_s"], r["ms_per_image"]]
                                               for r in section["batch"]])]
    if section.get("products"):
        parts += ["", "Products per batch (frames spread over P products with their own 4-shot states):", "",
                  table(["products", "batch", "images/s", "ms/image"],
                        [[r["products"], r["batch"], r["images_per_s"], r["ms_per_image"]]
                         for r in section["products"]])]
    if section.get("memory"):
        parts += ["", "Memory bank (k references; NN = the few-shot nearest-neighbour search alone):", "",
                  table(["k", "memory entries", "images/s", "ms/image", "NN ms/image"],
                        [[r["k"], r["memory_entries"], r["images_per_s"], r["ms_per_image"], r["nn_ms_per_image"]]
                         for r in section["memory"]])]
    if section.get("frame_size"):
        parts += ["", "Frame size (JPEG, one frame):", "",
                  table(["frame", "pixels", "JPEG KiB", "tiles", "decode ms", "pre-process ms",
                         "score ms", "total ms", "decode + pre-process ms (model.resize: fast)"],
                        [[r["frame"], f"{r['width']}x{r['height']}", r["jpeg_bytes"] / 1024, r["tiles"],
                          r["decode_ms"], r["preprocess_ms"], r["score_ms"], r["total_ms"],
                          r.get("fast_decode_preprocess_ms")] for r in section["frame_size"]])]
    if section.get("models"):
        parts += ["", "Models loaded (frames spread over one product per model):", "",
                  table(["models", "batch", "images/s", "ms/image", "load s (last model)", "RSS MiB after loading"],
                        [[r["models"], r["batch"], r["images_per_s"], r["ms_per_image"], r["load_s"], r["rss_mib"]]
                         for r in section["models"]])]
    return "\n".join(parts)


def _bf16(section: dict[str, Any], results: dict[str, Any]) -> str:
    if section.get("note"):
        return section["note"]
    rows = [[r["detector"], r["setting"], r["images_per_s"], r["gflop_per_image"], r["gflops"],
             r.get("ratio_bf16_gemm"), r.get("ratio_bf16_peak"), r.get("speedup_vs_fp32")]
            for r in section.get("rows", [])]
    text = (f"Model: {section.get('model', '?')} with `model.precision: bf16`.\n\n"
            + table(["detector", "setting", "images/s", "GFLOP/img", "GFLOP/s", "ratio to bf16 GEMM bound",
                     "ratio to bf16 peak", "speed-up vs fp32"], rows))
    accuracy = section.get("accuracy", [])
    if accuracy:
        text += ("\n\nAccuracy cost against fp32 (same seeded weights) on MVTec AD grid test images:\n\n"
                 + table(["setting", "images", "max abs score diff", "max abs map diff", "fp32 score range",
                          "fp32 map range"],
                         [[a["setting"], a["images"], a["max_abs_score_diff"], a["max_abs_map_diff"],
                           " – ".join(fmt(x, 4) for x in a["fp32_score_range"]),
                           " – ".join(fmt(x, 4) for x in a["fp32_map_range"])] for a in accuracy]))
    return text


def _compile(section: dict[str, Any], results: dict[str, Any]) -> str:
    rows = [[r["mode"], r["kernels"], r["images_per_s"], r["speedup_vs_off"], r["first_batch_s"],
             r["max_abs_score_diff"], r["max_abs_map_diff"]] for r in section.get("rows", [])]
    return (f"`model.compile` against the tower it replaces. Model: {section.get('model', '?')}; "
            f"{section.get('frames', '')}.\n\n"
            + table(["model.compile", "kernels", "images/s", "speed-up vs off", "first batch s", "max abs score diff",
                     "max abs map diff"], rows))


def _gpu(section: dict[str, Any], results: dict[str, Any]) -> str:
    if not section.get("measured"):
        return f"GPU: {section.get('note', 'not measured (no CUDA device)')}"
    rows = [[k.replace("_", " "), v] for k, v in section.items() if k != "measured"]
    return table(["what", "value"], rows)


SECTIONS = [
    ("1. Physical peak and library GEMM rates", "peak", _peak),
    ("2. Detectors", "detectors", _detectors),
    ("3. Daemon: engine-only vs end-to-end through Redis", "daemon", _daemon),
    ("4. Memory", "memory", _memory),
    ("5. Cost growth sweeps", "sweeps", _sweeps),
    ("6. bf16", "bf16", _bf16),
    ("7. torch.compile", "compile", _compile),
    ("8. GPU", "gpu", _gpu),
]


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """(Markdown, JSON) paths: ``out`` is a folder (report.md + report.json in it) or a .md/.json file name."""
    out = Path(out)
    if out.suffix in (".md", ".json"):
        return out.with_suffix(".md"), out.with_suffix(".json")
    return out / "report.md", out / "report.json"


def write_report(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    markdown, data = output_paths(out)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(to_json(results) + "\n")
    markdown.write_text(render_markdown(results))
    return markdown, data
