"""AnoPLe end to end on the tiny CLIP: a multi-class fit over hazelnut + grid + bottle (`inspectd fit anople`) lowers
the loss; the daemon scores frames of all three products (and an AnoPLe* product fitted by the registry) in mixed
batches with one forward each; `inspectd eval --detector anople --shots 1 2 4 --compare anople`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from inspectd.cli import main as cli_main
from inspectd.daemon.app import InspectDaemon
from inspectd.detectors.anople import AnoPle, AnoPleStar
from inspectd.detectors.anople.model import load_model
from inspectd.detectors.artifacts import load_artifact
from inspectd.detectors.base import ProductSpec, create_detector, detector_class
from inspectd.detectors.pipeline import score_images
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import DATA, HAZELNUT, daemon_config, png_bytes, wait_for_results

MVTEC = DATA / "mvtec_ad"
SOURCES = {"nut": ("hazelnut", HAZELNUT / "good"), "grid": ("grid", MVTEC / "grid" / "train" / "good"),
           "bottle": ("bottle", MVTEC / "bottle" / "test" / "good")}
TINY_FIT = ["--epochs", "3", "--multi-view", "true", "--no-progress"]


def tiny_model_flags(checkpoint: Path) -> list[str]:
    return ["--arch", "inspectd-tiny", "--pretrained", str(checkpoint), "--device", "cpu"]


@pytest.fixture(scope="module")
def products_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three product files, two 128-px normal references each."""
    root = tmp_path_factory.mktemp("anople-products")
    for product, (object_name, folder) in SOURCES.items():
        refs = root / f"{product}-refs"
        refs.mkdir()
        for path in sorted(folder.glob("*.png"))[:2]:
            (refs / path.name).write_bytes(png_bytes(path, size=128))
        (root / f"{product}.yaml").write_text(yaml.safe_dump({"id": product, "object_name": object_name,
                                                              "references": str(refs), "shots": 2}))
    return root


@pytest.fixture(scope="module")
def model_file(tiny_checkpoint: Path, products_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anople-model") / "anople.safetensors"
    args = ["fit", "anople", "--products-dir", str(products_dir), "--out", str(out), *tiny_model_flags(tiny_checkpoint),
            *TINY_FIT]
    assert cli_main(args) == 0
    return out


def test_a_multi_class_fit_over_three_products_lowers_the_loss(model_file: Path, tiny_backbone: Any) -> None:
    artifact = load_artifact(model_file)
    losses = [row["loss"] for row in artifact.training["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    data = artifact.training["data"]
    assert data["classes"] == ["bottle", "grid", "hazelnut"] and data["images"] == 6
    assert artifact.config["fit"]["lr"] == 0.001 and artifact.config["fit"]["decoder_lr"] == 0.0002
    model, _ = load_model(model_file, tiny_backbone)
    assert model.arch.prompt_depth == 2 and not any(p.requires_grad for p in model.parameters())
    assert detector_class("anople").learning.offline is not None and AnoPleStar.learning.per_product == "trained"
    with pytest.raises(ValueError, match="inspectd fit anople"):
        create_detector("anople", tiny_backbone, {})
    detector = create_detector("anople", tiny_backbone, {"model": str(model_file)})
    states = [detector.fit(ProductSpec(p, SOURCES[p][0]), []) for p in SOURCES]
    assert create_detector("anople", tiny_backbone, {"model": str(model_file)}).model is detector.model  # shared
    for state in states:  # the product-independent tower: the full-view token c_5 and the shared prompts
        assert torch.equal(state.tensors["view_token"], model.view_tokens[4])
        assert torch.equal(state.tensors["visual_prompts"], model.visual_prompts())
    assert not torch.allclose(states[0].tensors["text"], states[1].tensors["text"])  # per-class prototypes


def test_dataset_averaged_prototypes_are_an_option(tiny_backbone: Any, products_dir: Path, tmp_path: Path) -> None:
    from inspectd.detectors.anople.training import AnoPleFitConfig, AnoPleTrainer
    from inspectd.detectors.artifacts import save_artifact
    from inspectd.detectors.context import FitContext
    from inspectd.detectors.training.trainer import TrainingData

    products = [(ProductSpec(p, SOURCES[p][0]), [np.asarray(Image.open(f).convert("RGB"))
                                                 for f in sorted((products_dir / f"{p}-refs").glob("*.png"))[:1]])
                for p in ("nut", "grid")]
    config = AnoPleFitConfig(epochs=1, multi_view=False, prototypes="dataset")
    artifact = AnoPleTrainer(tiny_backbone, config).train(TrainingData(products=products), FitContext(),
                                                          show_progress=False)
    path = tmp_path / "dataset.safetensors"
    save_artifact(artifact, path)
    detector = create_detector("anople", tiny_backbone, {"model": str(path)})
    nut, bottle = (detector.fit(ProductSpec(p, SOURCES[p][0]), []) for p in ("nut", "bottle"))
    assert torch.equal(nut.tensors["text"], bottle.tensors["text"])  # class-agnostic w±
    assert nut.meta["prototype_classes"] == ["grid", "hazelnut"]
    with pytest.raises(ValueError, match="prototypes"):
        AnoPleFitConfig(prototypes="nope")


def test_fit_from_a_dataset_root_over_several_categories(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    args = ["fit", "anople", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "bottle",
            "--shots", "1", "--epochs", "1", "--multi-view", "false", "--out", str(out),
            *tiny_model_flags(tiny_checkpoint), "--no-progress"]
    assert cli_main(args) == 0
    data = load_artifact(out).training["data"]
    assert data["classes"] == ["bottle", "grid"] and data["images"] == 2


@pytest.mark.redis
async def test_the_daemon_scores_three_anople_products_and_a_star_one_in_mixed_batches_one_forward_each(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone, model_file, products_dir) -> None:
    products = [{"id": p, "object_name": SOURCES[p][0], "detector": "anople", "options": {"model": str(model_file)},
                 "references": str(products_dir / f"{p}-refs"), "shots": 2, "mask": "full"} for p in SOURCES]
    products.append({"id": "nut-star", "object_name": "hazelnut", "detector": "anople-star",
                     "options": {"epochs": 2, "multi_view": False}, "references": str(products_dir / "nut-refs"),
                     "shots": 2, "mask": "full"})
    config = daemon_config(redis_url, key_prefix, tmp_path, registry={"watch": False},
                           redis={"url": redis_url, "prefix": key_prefix, "lines": ["l1"], "block_ms": 50,
                                  "control_stream": None},
                           batcher={"max_batch_size": 8, "max_delay_ms": 40, "queue_size": 64}, products=products)
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        star = daemon.registry.get("nut-star")
        assert star.state.meta["steps_run"] == 4 and star.state.detector == "anople-star"
        forwards: list[tuple[int, int]] = []
        score = daemon.engine.score

        async def counting(items, frames=None):  # noqa: ANN001, ANN202
            before = tiny_backbone.forwards
            out = await score(items, frames)
            forwards.append((len({id(item.state) for item in items}), tiny_backbone.forwards - before))
            return out

        daemon.engine.score = counting
        frames = {"nut": png_bytes(HAZELNUT / "colour" / "03.png", 128),
                  "grid": png_bytes(sorted((MVTEC / "grid" / "test" / "bent").glob("*.png"))[0], 128),
                  "bottle": png_bytes(sorted((MVTEC / "bottle" / "test" / "broken_large").glob("*.png"))[0], 128),
                  "nut-star": png_bytes(HAZELNUT / "colour" / "03.png", 128)}
        order = list(frames)
        pipe = redis_client.pipeline(transaction=False)
        for i in range(16):
            product = order[i % 4]
            pipe.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields(product, "l1", f"f{i:02d}", frames[product]))
        await pipe.execute()
        results = await wait_for_results(redis_client, key_prefix, 16, timeout=60)
        entries = {p: daemon.registry.get(p) for p in frames}
    finally:
        await daemon.shutdown()
    assert sorted(r["frame_id"] for r in results) == [f"f{i:02d}" for i in range(16)]
    assert any(n >= 3 for n, _ in forwards) and all(f == 1 for _, f in forwards), forwards
    for record in results:
        assert record["detector"] == ("anople-star" if record["product"] == "nut-star" else "anople")
        assert Image.open(io.BytesIO(record["mask"])).size == (128, 128)
        entry = entries[record["product"]]
        image = np.asarray(Image.open(io.BytesIO(frames[record["product"]])).convert("RGB"))
        offline = score_images(entry.detector, entry.state, [image])[0]
        assert float(record["score"]) == pytest.approx(offline, rel=1e-4, abs=1e-6)


def test_eval_cli_runs_anople_with_shots_and_compare(tiny_checkpoint: Path, tiny_backbone: Any, model_file: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert detector_class("anople") is AnoPle
    out = tmp_path / "eval"
    args = ["eval", "--dataset", "mvtec", "--root", str(MVTEC), "--categories", "grid", "--detector", "anople",
            "--shots", "1", "2", "4", "--compare", "anople", "--arch", "inspectd-tiny", "--weights",
            str(tiny_checkpoint), "--device", "cpu", "--options", json.dumps({"model": str(model_file)}),
            "--out", str(out), "--cache", "", "--eval-size", "64"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"anople {k}-shot on mvtec_ad" in printed for k in (1, 2, 4))
    doc = json.loads((out / "anople_4shot.json").read_text())
    rows = {(r["category"], r["metric"]): r for r in doc["results"]}
    assert rows[("grid", "pixel_auroc")]["mean"] is not None
    assert rows[("mean", "image_auroc")]["paper"] == 96.3  # AnoPLe's 4-shot MVTec mean beside ours
    state = create_detector("anople", tiny_backbone, {"model": str(model_file)}).fit(ProductSpec("grid", "grid"), [])
    assert "memory" not in state.tensors  # zero-shot: text and decoder only
