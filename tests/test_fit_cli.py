"""`inspectd fit` as a user runs it: generic over detectors, flags from the trainer's Config, clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HAZELNUT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy"


def inspectd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspectd.cli", *args], capture_output=True, text=True, timeout=120)


def test_fit_help_lists_the_trainers_config_fields() -> None:
    out = inspectd("fit", "randword", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--pairs", "--epochs", "--seed", "--hidden", "--batch-size", "--out", "--arch", "--fresh"):
        assert flag in out.stdout
    assert "(default: 10000)" in out.stdout and "(default: 512,256,128)" in out.stdout


def test_fit_refuses_detectors_that_learn_nothing_offline_and_unknown_names() -> None:
    winclip = inspectd("fit", "winclip", "--out", "x.safetensors")
    assert winclip.returncode == 2
    assert "'winclip' learns nothing offline; trainable: anople, aprilgan, randword" in winclip.stderr
    unknown = inspectd("fit", "nope", "--out", "x.safetensors")
    assert unknown.returncode == 2 and "'nope' is not a detector" in unknown.stderr
    bare = inspectd("fit")
    assert bare.returncode == 2 and "randword" in bare.stdout


def test_bad_flag_values_name_the_flag(tmp_path: Path) -> None:
    out = inspectd("fit", "randword", "--out", str(tmp_path / "f.safetensors"), "--pairs", "many")
    assert out.returncode == 2 and "--pairs" in out.stderr
    odd = inspectd("fit", "randword", "--out", str(tmp_path / "f.safetensors"), "--batch-size", "7",
                   "--pretrained", "random", "--demo", "--arch", "inspectd-tiny")
    assert odd.returncode == 2 and "batch_size" in odd.stderr and "even" in odd.stderr


def test_model_quick_gelu_and_precision_flags_mirror_the_daemon_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from inspectd.detectors.artifacts import load_artifact

    for flag, value in (("--quick-gelu", "yes"), ("--precision", "fp8")):
        bad = inspectd("fit", "randword", "--out", str(tmp_path / "f.safetensors"), flag, value)
        assert bad.returncode == 2 and flag in bad.stderr and "must be one of" in bad.stderr, bad.stderr
    out = tmp_path / "quick.safetensors"
    ran = inspectd("fit", "randword", "--out", str(out), "--arch", "inspectd-tiny", "--pretrained",
                   str(tiny_checkpoint), "--device", "cpu", "--pairs", "32", "--epochs", "1", "--hidden", "8",
                   "--batch-size", "16", "--no-progress", "--quick-gelu", "true", "--precision", "fp32")
    assert ran.returncode == 0, ran.stderr
    recorded = load_artifact(out).backbone
    assert recorded["quick_gelu"] is True and recorded["dtype"] == "float32" and recorded["weights_id"]


def test_a_few_shot_fit_on_a_dataset_trains_on_the_references_eval_scores_with(tmp_path: Path) -> None:
    """`inspectd fit anople --root D --shots k --seed s` trains on each category's k-shot set of seed s, the very
    images `inspectd eval --shots k` builds that seed's product from (it took the first k in listing order)."""
    import argparse

    import numpy as np

    from inspectd.commands.fit import training_data
    from inspectd.detectors.anople.training import AnoPleFitConfig, AnoPleTrainer
    from inspectd.detectors.data.datasets import load_image, open_dataset, sample_references

    root = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hazelnut_toy"
    [category] = open_dataset(root, "folder")
    options = argparse.Namespace(root=[str(root)], dataset="folder", categories=None, products_dir=None)
    for seed in (0, 3):
        data = training_data(AnoPleTrainer, options, AnoPleFitConfig(shots=2, seed=seed))
        [(spec, images)] = data.products
        expected = [load_image(s.image_path) for s in sample_references(category.train, 2, seed)]
        assert len(images) == 2 and all(np.array_equal(a, b) for a, b in zip(images, expected, strict=True))
        assert data.summary["references"] == {"shots": 2, "seed": seed, "sampled_as": "inspectd eval"}
    everything = training_data(AnoPleTrainer, options, AnoPleFitConfig())
    assert len(everything.products[0][1]) == len(category.train)


@pytest.mark.parametrize(("flags", "named"), [(["--lr", "0"], "lr must be > 0"),
                                              (["--min-cover", "0.9", "--max-cover", "0.1"], "max_cover")])
def test_anople_fit_refuses_a_bad_recipe_before_loading_the_model(flags: list[str], named: str,
                                                                  tmp_path: Path) -> None:
    """A bad learning rate or cover failed only after the CLIP model loaded (minutes for a ViT-L), with errors such
    as "LoopConfig.lr ..." that name no flag."""
    done = inspectd("fit", "anople", "--out", str(tmp_path / "m.safetensors"), "--demo", "--pretrained", "random",
                    "--arch", "inspectd-tiny", "--dataset", "folder", "--root", str(HAZELNUT_ROOT), *flags)
    assert done.returncode == 2 and named in done.stderr and "LoopConfig" not in done.stderr, done.stderr
    assert "DEMO MODE" not in done.stderr  # refused before any model was built
