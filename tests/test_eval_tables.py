"""Result tables (mean ± std over seeds, mean row, Markdown/JSON/CSV, --compare) and the published numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from inspectd.detectors.evaluation.tables import (
    available_papers,
    comparison_for,
    load_published,
    summarize,
    to_markdown,
    write_csv,
    write_json,
)

SEEDS = [
    {"grid": {"image_auroc": 0.90, "pixel_auroc": 0.80}, "bottle": {"image_auroc": 0.98, "pixel_auroc": math.nan}},
    {"grid": {"image_auroc": 0.94, "pixel_auroc": 0.84}, "bottle": {"image_auroc": 1.00, "pixel_auroc": math.nan}},
]


def test_summarize_mean_row_and_std_over_seeds() -> None:
    t = summarize(SEEDS, title="winclip on mvtec_ad, 1-shot")
    assert list(t.rows) == ["grid", "bottle", "mean"] and t.metrics == ("image_auroc", "pixel_auroc")
    assert t.rows["grid"]["image_auroc"].mean == pytest.approx(0.92)
    assert t.rows["grid"]["image_auroc"].std == pytest.approx(0.02) and t.rows["grid"]["image_auroc"].n_seeds == 2
    # mean row: per-seed category means (0.94, 0.97), then mean ± std over seeds
    assert t.rows["mean"]["image_auroc"].mean == pytest.approx(0.955)
    assert t.rows["mean"]["image_auroc"].std == pytest.approx(0.015)
    # bottle has no pixel metrics: the pixel mean is grid's alone, and a note says so
    assert t.rows["mean"]["pixel_auroc"].mean == pytest.approx(0.82)
    assert math.isnan(t.rows["bottle"]["pixel_auroc"].mean)
    assert any("pixel_auroc over 1 of 2" in n for n in t.notes)
    single = summarize(SEEDS[:1])
    assert single.rows["grid"]["image_auroc"].std is None


def test_the_mean_row_takes_the_same_categories_in_every_seed() -> None:
    """A category that failed in one seed (a cell skipped with a note) made that seed's mean over fewer categories:
    the printed mean (81.0 here) was the mean of no set of rows above it, and no note said so."""
    seeds = [{"a": {"image_auroc": 0.90}, "b": {"image_auroc": 0.50}}, {"a": {"image_auroc": 0.92}}]
    t = summarize(seeds)
    assert t.rows["mean"]["image_auroc"].mean == pytest.approx(0.91)  # over a, the category every seed has
    assert t.rows["b"]["image_auroc"].mean == pytest.approx(0.50) and t.rows["b"]["image_auroc"].n_seeds == 1
    assert any("over 1 of 2" in n and "b only in some seeds" in n for n in t.notes)


def test_markdown_json_csv_and_compare(tmp_path: Path) -> None:
    t = summarize(SEEDS, title="demo")
    md = to_markdown(t)
    assert "| category | I-AUROC | P-AUROC |" in md
    assert "| grid | 92.0 ± 2.0 | 82.0 ± 2.0 |" in md
    assert "| **mean** | 95.5 ± 1.5 | 82.0 ± 2.0 |" in md
    assert "| bottle | 99.0 ± 1.0 | – |" in md
    paper = {"grid": {"image_auroc": 99.5}, "mean": {"image_auroc": 93.1, "pixel_auroc": 95.2}}
    md = to_markdown(t, compare=paper)
    assert "| grid | 92.0 ± 2.0 | 99.5 | -7.5 | 82.0 ± 2.0 | – | – |" in md
    assert "| **mean** | 95.5 ± 1.5 | 93.1 | +2.4 |" in md
    write_json(t, tmp_path / "r.json", compare=paper, extra={"detector": "winclip"})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["detector"] == "winclip" and doc["units"] == "percent"
    rec = next(r for r in doc["results"] if (r["category"], r["metric"]) == ("grid", "image_auroc"))
    assert rec["mean"] == pytest.approx(92.0) and rec["paper"] == 99.5 and rec["diff"] == pytest.approx(-7.5)
    assert next(r for r in doc["results"] if r["category"] == "bottle" and r["metric"] == "pixel_auroc")["mean"] is None
    write_csv(t, tmp_path / "r.csv", compare=paper)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 3 * 2 and rows[0]["category"] == "grid" and float(rows[0]["diff"]) == pytest.approx(-7.5)


def test_published_numbers_load_and_match_the_spec_tables() -> None:
    assert {"winclip", "randword", "aprilgan", "promptad", "anople"} <= set(available_papers())
    w = load_published("winclip")
    assert w["mvtec_ad/0-shot"]["mean"]["image_auroc"] == 91.8
    assert w["mvtec_ad/0-shot"]["mean"]["pixel_pro"] == 64.6
    assert w["mvtec_ad/0-shot"]["grid"] == {"image_auroc": 98.8, "image_ap": 99.6, "image_f1_max": 98.2,
                                            "pixel_auroc": 82.2, "pixel_pro": 57.0}
    assert w["mvtec_ad/4-shot"]["capsule"]["image_auroc"] == 82.3 and w["mvtec_ad/4-shot"]["capsule"][
        "image_auroc_std"] == 8.9
    assert w["mvtec_ad/1-shot"]["transistor"]["pixel_auroc"] == 85.0
    assert w["visa/2-shot"]["mean"]["pixel_f1_max"] == 43.5
    mvtec = [c for c in w["mvtec_ad/0-shot"] if c != "mean"]
    assert len(mvtec) == 15
    # the printed mean row is the mean of the printed categories (to rounding)
    assert sum(w["mvtec_ad/0-shot"][c]["image_auroc"] for c in mvtec) / 15 == pytest.approx(91.8, abs=0.06)
    r = load_published("randword")
    assert r["mvtec_ad/0-shot"]["mean"]["image_auroc"] == 93.0
    assert r["visa/4-shot"]["mean"]["image_f1_max"] == 84.5
    assert r["mvtec_ad/2-shot"]["zipper"]["image_auroc"] == 93.8
    assert r["mvtec_ad/1-shot/winclip+"]["screw"]["image_auroc"] == 86.4
    a = load_published("aprilgan")
    assert a["mvtec_ad/0-shot"]["mean"]["pixel_auroc"] == 87.6 and a["visa/4-shot"]["mean"]["image_ap"] == 94.5
    assert a["mvtec_ad/0-shot"]["carpet"]["pixel_pro"] == 48.5
    p = load_published("promptad")
    assert p["mvtec_ad/1-shot"]["mean"]["image_auroc"] == 94.6 and p["visa/4-shot"]["mean"]["pixel_auroc"] == 97.4
    assert p["mvtec_ad/4-shot"]["mean"]["pixel_pro"] == 90.5
    n = load_published("anople")
    assert n["visa/1-shot"]["mean"]["image_auroc"] == 86.2 and n["visa/1-shot"]["mean"]["image_auroc_std"] == 2.0
    assert comparison_for("winclip", "mvtec_ad", 0)["mean"]["image_f1_max"] == 92.9
    with pytest.raises(ValueError, match="has no setting"):
        comparison_for("winclip", "mvtec_ad", 8)
    with pytest.raises(ValueError, match="available"):
        load_published("nope")
