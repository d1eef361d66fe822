"""Registry state cache across restarts (no refit; corrupt files rebuilt) and threshold calibration on hazelnut."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inspectd.daemon.config import ProductConfig, RegistryConfig, ThresholdConfig
from inspectd.daemon.registry import BuildError, ProductRegistry, load_images
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.detectors.winclip import WinClip
from tests.daemon_helpers import HAZELNUT, png_bytes

K = 4
# Measured with the tiny random-weight model (fixture tiny_backbone, seed 0), k = 4 goods 00..03:
# threshold 0.1925 (max leave-one-out normal 0.1725 + margin 0.02); colour defects flagged 16/17 (94 %);
# remaining goods flagged 0/30. k = 1 (four shifted views of good 00 as normals): threshold 0.1964,
# colour flagged 16/17, goods flagged 0/33. The floor leaves room for numeric noise across CPUs.
DEFECT_RATE_FLOOR = 0.80


@pytest.fixture
def fit_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = WinClip.fit

    def counting_fit(self, spec, references, ctx=None):  # noqa: ANN001, ANN202
        calls.append(len(references))
        return original(self, spec, references, ctx)

    monkeypatch.setattr(WinClip, "fit", counting_fit)
    return calls


def nut_refs(tmp: Path, names: tuple[str, ...] = ("00", "01", "02")) -> Path:
    refs = tmp / "refs"
    refs.mkdir(exist_ok=True)
    for name in names:
        (refs / f"{name}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{name}.png"))
    return refs


async def test_restart_loads_the_cached_state_without_fitting(tmp_path, tiny_backbone, fit_calls) -> None:
    cache = RegistryConfig(state_cache_dir=str(tmp_path / "cache"))
    product = ProductConfig(id="nut", object_name="hazelnut", references=str(nut_refs(tmp_path)), shots=3)
    first = ProductRegistry(tiny_backbone, cache)
    built = await first.put(product)
    first.close()
    assert fit_calls == [3, 2, 2, 2]  # the state, then one leave-one-out fit per reference
    files = list((tmp_path / "cache").glob("nut-*.safetensors"))
    assert [f.name for f in files] == [f"nut-{built.fingerprint}.safetensors"]

    fit_calls.clear()
    second = ProductRegistry(tiny_backbone, cache)  # "restart"
    loaded = await second.put(product)
    assert fit_calls == []
    assert loaded.fingerprint == built.fingerprint and loaded.threshold == built.threshold
    assert loaded.calibration == built.calibration
    for name, tensor in built.state.tensors.items():
        assert loaded.state.tensors[name].equal(tensor)

    # a corrupt cache file is rebuilt, not fatal, and replaced by a good one
    files[0].write_bytes(b"\x00garbage" * 100)
    third = ProductRegistry(tiny_backbone, cache)
    rebuilt = await third.put(product)
    assert fit_calls == [3, 2, 2, 2] and rebuilt.threshold == pytest.approx(built.threshold)
    fit_calls.clear()
    assert (await ProductRegistry(tiny_backbone, cache).put(product)).fingerprint == built.fingerprint
    assert fit_calls == []

    # different reference bytes -> a different fingerprint -> a real build
    (Path(product.references) / "02.png").write_bytes(png_bytes(HAZELNUT / "good" / "09.png"))
    changed = await ProductRegistry(tiny_backbone, cache).put(product)
    assert changed.fingerprint != built.fingerprint and fit_calls == [3, 2, 2, 2]


async def test_unchanged_rebuild_is_skipped_only_when_not_forced(tmp_path, tiny_backbone, fit_calls) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig())
    product = ProductConfig(id="nut", object_name="hazelnut", references=str(nut_refs(tmp_path)), shots=3)
    first = await registry.put(product)
    assert (await registry.reload("nut", force=False)) is first and registry.builds == 1
    assert (await registry.reload("nut")).version == 2  # an explicit reload rebuilds
    # a failed first build leaves 'failed' (twice in a row too), never a stuck 'building'
    for _ in range(2):
        with pytest.raises(BuildError):
            await registry.put(ProductConfig(id="bad", references=str(tmp_path / "missing")))
        assert registry.status("bad") == "failed"
    assert await registry.remove("bad") and not await registry.remove("bad")


async def test_calibration_options(tmp_path, tiny_backbone) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig())
    refs = str(nut_refs(tmp_path))
    fixed = await registry.put(ProductConfig(id="a", references=refs, threshold=ThresholdConfig(value=0.3)))
    assert fixed.threshold == 0.3 and fixed.calibration == {"method": "fixed"}
    one = await registry.put(ProductConfig(id="b", references=refs, shots=1))
    assert one.calibration["method"] == "quantile" and one.calibration["shifted_views"] == 4
    assert one.threshold == pytest.approx(one.calibration["max_normal"] + 0.02)
    zero = await registry.put(ProductConfig(id="z", shots=0))
    assert zero.calibration["method"] == "default" and zero.threshold == 0.5
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    for name in ("20", "21", "22"):
        (holdout / f"{name}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{name}.png"))
    mixed = await registry.put(ProductConfig(id="c", references=refs, shots=3, threshold=ThresholdConfig(
        quantile=0.5, margin=0.0, holdout_dir=str(holdout))))
    cal = mixed.calibration
    assert cal["normals"] == 6 and cal["leave_one_out"] == 3 and cal["holdout"] == 3
    assert cal["min_normal"] <= mixed.threshold <= cal["max_normal"]  # the median, no margin
    with pytest.raises(BuildError, match="quantile"):
        await registry.put(ProductConfig(id="d", references=refs, threshold=ThresholdConfig(quantile=1.5)))


@pytest.mark.parametrize("k", [1, K])
async def test_calibrated_threshold_on_hazelnut_colour(tmp_path, tiny_backbone, k) -> None:
    goods = sorted((HAZELNUT / "good").glob("*.png"))
    defects = sorted((HAZELNUT / "colour").glob("*.png"))
    refs = tmp_path / "refs"
    refs.mkdir()
    for path in goods[:k]:
        shutil.copy(path, refs / path.name)
    registry = ProductRegistry(tiny_backbone, RegistryConfig())
    entry = await registry.put(ProductConfig(id="hazelnut", object_name="hazelnut", references=str(refs), shots=k))
    assert entry.calibration["method"] == "quantile"
    assert entry.calibration["normals"] == (k if k >= 2 else 4)  # k = 1: four shifted views
    assert entry.threshold == pytest.approx(entry.calibration["max_normal"] + 0.02)

    def flagged(paths: list[Path]) -> list[bool]:
        outputs = run([ScoreItem(entry.detector, entry.state, image) for image in load_images(paths)])
        return [o.score >= entry.threshold for o in outputs]

    good_flags = flagged(goods[k:])
    defect_flags = flagged(defects)
    defect_rate = sum(defect_flags) / len(defect_flags)
    print(f"threshold {entry.threshold:.4f}; colour flagged {sum(defect_flags)}/{len(defect_flags)} "
          f"({defect_rate:.0%}); goods flagged {sum(good_flags)}/{len(good_flags)}")
    assert not all(good_flags), "the threshold flags every good image"
    assert defect_rate >= DEFECT_RATE_FLOOR


async def test_bad_mask_policy_is_rejected_at_build(tiny_backbone) -> None:
    registry = ProductRegistry(tiny_backbone, RegistryConfig())
    with pytest.raises(BuildError, match="mask policy"):
        await registry.put(ProductConfig(id="m", shots=0, mask="fulll"))
    entry = await registry.put(ProductConfig(id="m", shots=0, mask="downscaled:64"))
    assert entry.mask_policy.mode == "downscaled" and entry.mask_policy.max_side == 64
