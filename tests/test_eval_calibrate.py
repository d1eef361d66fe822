"""`inspectd eval --calibrate` builds each category exactly as the daemon does and reports verdict quality at
the deployed threshold: the same references give the daemon's registry the same threshold and verdicts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from inspectd.cli import main
from inspectd.daemon.config import ProductConfig, RegistryConfig
from inspectd.daemon.registry import ProductRegistry, load_images
from inspectd.detectors.data.datasets import open_dataset, sample_references
from inspectd.detectors.evaluation.runner import verdict_metrics
from inspectd.detectors.pipeline import score_images

TOY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy"


def test_verdict_metrics_count_ng_decisions() -> None:
    scored = [(0.9, 1), (0.8, 0), (0.7, 1), (0.2, 1), (0.1, 0)]
    got = verdict_metrics(scored, 0.5)  # NG: 0.9 (tp), 0.8 (fp), 0.7 (tp); missed: 0.2
    assert got["verdict_precision"] == pytest.approx(2 / 3) and got["verdict_recall"] == pytest.approx(2 / 3)
    assert got["verdict_f1"] == pytest.approx(2 / 3)
    assert verdict_metrics([(0.1, 1)], 0.5)["verdict_f1"] == 0.0


async def test_eval_calibrate_reproduces_the_daemon_build(tiny_checkpoint: Path, tiny_backbone, tmp_path: Path,
                                                          capsys) -> None:
    args = ["eval", "--dataset", "folder", "--root", str(TOY), "--shots", "2", "--calibrate", "--arch",
            "inspectd-tiny", "--weights", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--cache",
            str(tmp_path / "cache"), "--eval-size", "64"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NG-Prec" in printed and "NG-Rec" in printed and "NG-F1" in printed
    doc = json.loads((tmp_path / "out" / "winclip_2shot.json").read_text())
    rows = {(r["category"], r["metric"]): r["mean"] for r in doc["results"]}
    [note] = [n for n in doc["notes"] if "calibrated threshold" in n]
    eval_threshold = float(re.search(r"calibrated threshold ([0-9.]+)", note).group(1))
    assert "2 leave one out" in note

    # the daemon's registry, given the same two references, builds the same threshold and the same verdicts
    [category] = open_dataset(TOY, "folder")
    refs = sample_references(category.train, 2, 0)
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    for sample in refs:
        shutil.copy(sample.image_path, ref_dir / Path(sample.image_path).name)
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    entry = await registry.put(ProductConfig(id="hazelnut", object_name="hazelnut", references=str(ref_dir), shots=2))
    registry.close()
    assert entry.threshold == pytest.approx(eval_threshold, abs=5e-5)
    tests = category.test_samples(exclude=refs)
    scores = score_images(entry.detector, entry.state, load_images([Path(s.image_path) for s in tests]))
    daemon_view = verdict_metrics(list(zip(scores, [s.label for s in tests], strict=True)), entry.threshold)
    for metric, value in daemon_view.items():
        assert rows[("hazelnut", metric)] == pytest.approx(100 * value, abs=1e-6), metric
