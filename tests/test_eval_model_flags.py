"""`inspectd eval --quick-gelu/--precision`: the model settings `inspectd fit` has, reaching the evaluated backbone.

`inspectd eval` had neither flag, so a checkpoint that needs QuickGELU (or a bf16 run) could not be evaluated as
the daemon runs it. Run end to end on the real shared MVTec grid images with the tiny random-weight checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inspectd.cli import main
from inspectd.detectors.evaluation.cache import ScoreCache

MVTEC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad"


def run_eval(checkpoint: Path, out: Path, cache: Path, *extra: str) -> dict[str, Any]:
    args = ["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "--detector", "winclip"]
    args += ["--shots", "0", "--weights", str(checkpoint), "--device", "cpu", "--eval-size", "64"]
    assert main([*args, "--out", str(out), "--cache", str(cache), *extra]) == 0
    return json.loads((out / "winclip_0shot.json").read_text())


def metric_values(doc: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(r["category"], r["metric"]): r["mean"] for r in doc["results"]}


def test_eval_quick_gelu_and_precision_reach_the_backbone_and_the_score_cache(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    n_test = sum(1 for _ in (MVTEC / "grid" / "test").rglob("*.png"))
    plain = run_eval(tiny_checkpoint, tmp_path / "plain", cache)
    assert plain["model"]["quick_gelu"] == "false" and plain["model"]["dtype"] == "float32"  # auto, on CPU
    assert len(ScoreCache(cache)) == n_test

    quick = run_eval(tiny_checkpoint, tmp_path / "quick", cache, "--quick-gelu", "true")
    assert quick["model"]["quick_gelu"] == "true"
    assert len(ScoreCache(cache)) == 2 * n_test  # scored anew under their own keys, not served from GELU's
    assert metric_values(quick) != metric_values(plain)  # another activation, other scores

    bf16 = run_eval(tiny_checkpoint, tmp_path / "bf16", cache, "--precision", "bf16")
    assert bf16["model"]["dtype"] == "bfloat16" and bf16["model"]["quick_gelu"] == "false"
    assert len(ScoreCache(cache)) == 3 * n_test

    again = run_eval(tiny_checkpoint, tmp_path / "again", cache, "--quick-gelu", "true")
    assert len(ScoreCache(cache)) == 3 * n_test  # the same setting again: all from the cache
    assert metric_values(again) == metric_values(quick)


@pytest.mark.parametrize(("flag", "value", "message"), [("--precision", "fp8", "fp8"), ("--quick-gelu", "yes", "yes")])
def test_eval_model_flags_are_validated_as_the_daemon_config(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--root", str(MVTEC), flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be one of" in err and message in err
