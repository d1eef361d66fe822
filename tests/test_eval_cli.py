"""`inspectd eval` end to end on the real shared MVTec images with the tiny test checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspectd.cli import main

MVTEC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad"


def count_forwards(monkeypatch) -> list[int]:  # noqa: ANN001
    """A list that grows by one per image-tower forward from now on."""
    from inspectd.detectors.backbone import ClipBackbone

    forwards: list[int] = []
    original = ClipBackbone.forward

    def counting(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        forwards.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(ClipBackbone, "forward", counting)
    return forwards


def test_eval_mvtec_grid_bottle_writes_three_outputs(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch,
                                                     caplog) -> None:
    args = ["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "bottle",
            "--detector", "winclip", "--shots", "0", "1", "--seeds", "2", "--weights", str(tiny_checkpoint),
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--eval-size", "128",
            "--compare", "winclip"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "### winclip 0-shot on mvtec_ad" in printed and "### winclip 1-shot on mvtec_ad (2 seed(s))" in printed
    for shots in (0, 1):
        for suffix in ("md", "json", "csv"):
            assert (tmp_path / "out" / f"winclip_{shots}shot.{suffix}").is_file()
    doc = json.loads((tmp_path / "out" / "winclip_1shot.json").read_text())
    rows = {(r["category"], r["metric"]): r for r in doc["results"]}
    assert rows[("grid", "pixel_pro")]["mean"] is not None  # grid has masks
    assert rows[("bottle", "pixel_auroc")]["mean"] is None  # bottle has none: image metrics only
    assert rows[("bottle", "image_auroc")]["n_seeds"] == 2 and rows[("bottle", "image_auroc")]["std"] is not None
    assert rows[("mean", "image_auroc")]["paper"] == 93.1  # WinCLIP+ 1-shot MVTec mean, beside ours
    assert any("have no mask" in note for note in doc["notes"])
    assert doc["demo_weights"] is True  # the tiny checkpoint file is marked as random weights by its generator
    import csv

    with (tmp_path / "out" / "winclip_1shot.csv").open() as handle:
        assert {row["demo_weights"] for row in csv.DictReader(handle)} == {"true"}
    assert not any("masks missing" in note for note in doc["notes"])  # said once, not twice in other words
    # a second run is served from the score cache: same numbers, no image-tower forward at all
    first = (tmp_path / "out" / "winclip_1shot.csv").read_text()
    forwards = count_forwards(monkeypatch)
    caplog.set_level("INFO", logger="inspectd.detectors.evaluation.runner")
    assert main(args) == 0
    assert (tmp_path / "out" / "winclip_1shot.csv").read_text() == first
    assert forwards == []
    n_test = sum(1 for _ in (MVTEC / "grid" / "test").rglob("*.png")) + sum(
        1 for _ in (MVTEC / "bottle" / "test").rglob("*.png"))
    hits = [r.getMessage() for r in caplog.records if "score cache:" in r.getMessage()]
    assert hits == [f"score cache: {n_test * 3} hit(s), 0 miss(es)"]  # 0-shot once + 1-shot x 2 seeds


def test_eval_resize_fast_scores_anew_and_says_so(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    args = ["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "--detector", "winclip",
            "--shots", "0", "--weights", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--eval-size", "64"]
    assert main(args) == 0
    forwards = count_forwards(monkeypatch)
    assert main([*args, "--resize", "fast"]) == 0
    assert forwards  # not served from the exact run's score cache: other inputs, other scores
    doc = json.loads((tmp_path / "out" / "winclip_0shot.json").read_text())
    assert doc["model"]["resize"] == "fast"



def test_a_rerun_at_another_eval_size_or_with_other_references_scores_anew(tiny_checkpoint: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:  # noqa: ANN001
    """The score cache had no map size in its key: a re-run at another --eval-size loaded the old maps, and every
    category with masks failed ("anomaly map (64, 64) and mask (96, 96) must be the same H x W"). Nor did it know
    the references: another train/good pool reused the old few-shot scores."""
    import shutil

    root = tmp_path / "mvtec"
    shutil.copytree(MVTEC / "grid", root / "grid")
    args = ["eval", "--dataset", "mvtec", "--root", str(root), "--categories", "grid", "--detector", "winclip",
            "--shots", "1", "--weights", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache")]
    assert main([*args, "--eval-size", "64"]) == 0
    forwards = count_forwards(monkeypatch)
    assert main([*args, "--eval-size", "96"]) == 0
    doc = json.loads((tmp_path / "out" / "winclip_1shot.json").read_text())
    rows = {(r["category"], r["metric"]): r for r in doc["results"]}
    assert rows[("grid", "pixel_pro")]["mean"] is not None and forwards
    forwards.clear()
    assert main([*args, "--eval-size", "96"]) == 0
    assert forwards == []  # the same run again is served from the cache
    for good in (root / "grid" / "train" / "good").iterdir():  # the same names, other pictures
        good.write_bytes((MVTEC / "bottle" / "test" / "good" / "000.png").read_bytes())
    assert main([*args, "--eval-size", "96"]) == 0
    assert forwards  # scored anew against the new references


@pytest.mark.parametrize(("flag", "value", "allowed"), [
    ("--batch-size", "-3", "must be >= 0 (0 = auto)"),  # evaluated nothing and exited 0
    ("--eval-size", "0", "must be >= 1"),  # failed only after the model loaded
    ("--seeds", "0", "must be >= 1"),
    ("--shots", "-1", "must be >= 0 (0 = zero-shot)"),
])
def test_eval_refuses_out_of_range_counts_before_loading_anything(flag: str, value: str, allowed: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: {allowed}, got {value}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--root", str(MVTEC), flag, "x"])
    assert f"argument {flag}: invalid int value: 'x'" in capsys.readouterr().err


def test_eval_batch_size_0_still_means_auto() -> None:
    from inspectd.cli import build_parser

    args = build_parser().parse_args(["eval", "--root", str(MVTEC), "--batch-size", "0", "--seeds", "1",
                                      "--eval-size", "1", "--shots", "0", "4"])
    assert (args.batch_size, args.seeds, args.eval_size, args.shots) == (0, 1, 1, [0, 4])
