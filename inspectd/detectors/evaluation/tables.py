"""Result tables: per-category metrics over seeds → mean ± std with a mean row, Markdown/JSON/CSV writers, and
published paper numbers (``inspectd/data/published/<paper>.json``) to compare against.

Metric values inside a `ResultTable` are fractions in [0, 1] as `metrics` returns them; writers scale them to
percent (``scale=100``) because papers print percent, and published numbers are stored in percent.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from inspectd.detectors.evaluation.metrics import ALL_METRICS

MEAN_ROW = "mean"
LABELS = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1_max": "P-F1max", "pixel_pro": "PRO",
    "verdict_precision": "NG-Prec", "verdict_recall": "NG-Rec", "verdict_f1": "NG-F1",
    "vand_hmean": "VAND",
}
VERDICT_METRICS = ("verdict_precision", "verdict_recall", "verdict_f1")  # at the calibrated threshold
VAND_METRIC = "vand_hmean"  # VAND 2023 summary: harmonic mean of image and pixel F1-max per category


def vand_hmean(image_f1_max: float, pixel_f1_max: float) -> float:
    """The VAND challenge's per-category score (its summary averages it over categories)."""
    if math.isnan(image_f1_max) or math.isnan(pixel_f1_max) or image_f1_max + pixel_f1_max == 0:
        return math.nan
    return 2 * image_f1_max * pixel_f1_max / (image_f1_max + pixel_f1_max)


def with_vand(rows: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Published rows plus the VAND score where both F1-max values are printed; the mean row is the mean of the
    per-category scores when those exist (as the challenge computes it), else from the mean F1s."""
    out = {c: dict(r) for c, r in rows.items()}
    scored = []
    for category, row in out.items():
        if "image_f1_max" in row and "pixel_f1_max" in row:
            row[VAND_METRIC] = vand_hmean(row["image_f1_max"], row["pixel_f1_max"])
            if category != MEAN_ROW:
                scored.append(row[VAND_METRIC])
    if scored and MEAN_ROW in out:
        out[MEAN_ROW][VAND_METRIC] = float(np.mean(scored))
    return out
PerCategory = Mapping[str, Mapping[str, float]]  # category -> metric -> value
Published = dict[str, dict[str, dict[str, float]]]  # setting -> category -> metric -> value (percent)


@dataclass(frozen=True)
class Stat:
    """One cell: mean and (population, ddof=0) std over seeds of a metric; std is None for a single seed."""

    mean: float
    std: float | None
    n_seeds: int


@dataclass
class ResultTable:
    """Rows = categories then the mean row; columns = metrics. Values are fractions."""

    title: str
    rows: dict[str, dict[str, Stat]]
    metrics: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(per_seed: Sequence[PerCategory], title: str = "", metrics: Sequence[str] | None = None,
              notes: Sequence[str] = (), ddof: int = 0) -> ResultTable:
    """Mean ± std over seeds of every category's metrics, plus a mean-over-categories row.

    The mean row is computed per seed first, then aggregated over seeds (so its std is the seed-to-seed spread of
    the category mean, as papers report it). NaN categories (e.g. no masks) are left out of a metric's mean and a
    note says over how many categories it was taken.
    """
    if not per_seed:
        raise ValueError("no results to summarise")
    categories = list(dict.fromkeys(c for run in per_seed for c in run if c != MEAN_ROW))
    if metrics is None:
        present = {m for run in per_seed for row in run.values() for m in row}
        known = (*ALL_METRICS, *VERDICT_METRICS, VAND_METRIC)
        metrics = [m for m in known if m in present] + sorted(present - set(known))
    out_notes = list(notes)
    per_seed_rows = [{c: {m: float(run.get(c, {}).get(m, math.nan)) for m in metrics} for c in categories}
                     for run in per_seed]
    for rows in per_seed_rows:
        rows[MEAN_ROW] = {}
    for m in metrics:
        # every seed's mean over the same categories: one missing in some seeds (a cell that failed) is left out
        # of all of them, or the mean row would mix category sets and not be the mean of the rows above it
        defined = [c for c in categories if all(not math.isnan(rows[c][m]) for rows in per_seed_rows)]
        partial = [c for c in categories if c not in defined
                   and any(not math.isnan(rows[c][m]) for rows in per_seed_rows)]
        for rows in per_seed_rows:
            rows[MEAN_ROW][m] = _nanmean([rows[c][m] for c in defined])
        if 0 < len(defined) < len(categories):
            note = f"mean {m} over {len(defined)} of {len(categories)} categories (others undefined"
            out_notes.append(note + (f"; {', '.join(partial)} only in some seeds)" if partial else ")"))
    table: dict[str, dict[str, Stat]] = {}
    for c in [*categories, MEAN_ROW]:
        table[c] = {}
        for m in metrics:
            vals = np.array([rows[c][m] for rows in per_seed_rows], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            if vals.size == 0:
                table[c][m] = Stat(math.nan, None, 0)
            else:
                std = float(np.std(vals, ddof=ddof)) if vals.size > 1 else None
                table[c][m] = Stat(float(vals.mean()), std, int(vals.size))
    return ResultTable(title, table, tuple(metrics), out_notes)


# ------------------------------------------------------------------------------------------- published numbers


def available_papers() -> list[str]:
    folder = resources.files("inspectd.data") / "published"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


@cache
def _published_doc(paper: str) -> dict[str, Any]:
    path = resources.files("inspectd.data") / "published" / f"{paper}.json"
    if not path.is_file():
        raise ValueError(f"no published numbers for {paper!r}; available: {available_papers()}")
    return json.loads(path.read_text())


def load_published(paper: str) -> Published:
    """{setting: {category: {metric: value}}} in percent; settings "<dataset>/<k>-shot[/<variant>]" (e.g.
    "mvtec_ad/0-shot", "visa/4-shot/patchcore"); "<metric>_std" keys hold the paper's std where printed.
    """
    return json.loads(json.dumps(_published_doc(paper)["settings"]))  # a copy callers may modify


def published_notes(paper: str) -> list[str]:
    return list(_published_doc(paper).get("notes", []))


def setting_name(dataset: str, shots: int, variant: str | None = None) -> str:
    return f"{dataset}/{shots}-shot" + (f"/{variant}" if variant else "")


def comparison_for(paper: str, dataset: str, shots: int, variant: str | None = None) -> dict[str, dict[str, float]]:
    """The published rows to put beside ours (``--compare PAPER``); ValueError naming the settings it has."""
    settings = load_published(paper)
    key = setting_name(dataset, shots, variant)
    if key not in settings:
        raise ValueError(f"{paper} has no setting {key!r}; it has: {sorted(settings)}")
    return settings[key]


# ------------------------------------------------------------------------------------------- writers


def _fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cells(table: ResultTable, category: str, metric: str, compare: PerCategory | None, scale: float,
           digits: int) -> list[str]:
    stat = table.rows[category][metric]
    ours = _fmt(stat.mean * scale, digits)
    if stat.std is not None and not math.isnan(stat.mean):
        ours += f" ± {_fmt(stat.std * scale, digits)}"
    if compare is None:
        return [ours]
    paper = compare.get(category, {}).get(metric)
    diff = stat.mean * scale - paper if paper is not None else None
    return [ours, _fmt(paper, digits), _fmt(diff, digits, signed=True)]


def to_markdown(table: ResultTable, compare: PerCategory | None = None, scale: float = 100.0, digits: int = 1,
                compare_label: str = "paper") -> str:
    """A Markdown table (categories, then the bold mean row); with ``compare``, paper and Δ (ours − paper) columns."""
    header = ["category"]
    for m in table.metrics:
        label = LABELS.get(m, m)
        header += [label] if compare is None else [label, f"{label} {compare_label}", "Δ"]
    lines = []
    if table.title:
        lines += [f"### {table.title}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for category in table.rows:
        cells = [c for m in table.metrics for c in _cells(table, category, m, compare, scale, digits)]
        name = f"**{category}**" if category == MEAN_ROW else category
        lines.append("| " + " | ".join([name, *cells]) + " |")
    if table.notes:
        lines += ["", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines) + "\n"


def to_terminal(table: ResultTable, compare: PerCategory | None = None, scale: float = 100.0, digits: int = 1,
                compare_label: str = "paper") -> str:
    """What fits a terminal: without ``compare`` the Markdown table; with it, one row per metric (ours, the paper's,
    Δ) for every category as a column block of three, so the width grows with categories, not with metrics x 3."""
    if compare is None:
        return to_markdown(table, None, scale, digits)
    lines = [f"### {table.title}", ""] if table.title else []
    categories = list(table.rows)
    header = ["metric"] + [f"{'mean' if c == MEAN_ROW else c} ({cell})" for c in categories
                           for cell in ("ours", compare_label, "Δ")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in table.metrics:
        cells = [c for category in categories for c in _cells(table, category, metric, compare, scale, digits)]
        lines.append("| " + " | ".join([LABELS.get(metric, metric), *cells]) + " |")
    if table.notes:
        lines += ["", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines) + "\n"


def to_records(table: ResultTable, compare: PerCategory | None = None, scale: float = 100.0) -> list[dict[str, Any]]:
    """Long format: one record per (category, metric) with mean, std, n_seeds, and paper/diff when comparing."""
    records = []
    for category, row in table.rows.items():
        for metric in table.metrics:
            stat = row[metric]
            rec: dict[str, Any] = {
                "category": category, "metric": metric,
                "mean": None if math.isnan(stat.mean) else stat.mean * scale,
                "std": None if stat.std is None else stat.std * scale, "n_seeds": stat.n_seeds,
            }
            if compare is not None:
                paper = compare.get(category, {}).get(metric)
                rec["paper"] = paper
                rec["diff"] = None if paper is None or rec["mean"] is None else rec["mean"] - paper
            records.append(rec)
    return records


def write_json(table: ResultTable, path: str | Path, compare: PerCategory | None = None, scale: float = 100.0,
               extra: Mapping[str, Any] | None = None) -> None:
    doc = {"title": table.title, "units": "percent" if scale == 100.0 else f"x{scale}", "metrics": list(table.metrics),
           "notes": table.notes, **(dict(extra) if extra else {}), "results": to_records(table, compare, scale)}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def write_csv(table: ResultTable, path: str | Path, compare: PerCategory | None = None, scale: float = 100.0,
              demo_weights: bool = False) -> None:
    """One row per (category, metric); every row says ``demo_weights`` (true: random weights, meaningless)."""
    records = to_records(table, compare, scale)
    fields = ["category", "metric", "mean", "std", "n_seeds"] + (["paper", "diff"] if compare is not None else [])
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*fields, "demo_weights"])
        writer.writeheader()
        for rec in records:
            row = {k: "" if rec[k] is None else rec[k] for k in fields}
            writer.writerow({**row, "demo_weights": str(bool(demo_weights)).lower()})
