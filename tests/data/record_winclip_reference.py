"""Record WinCLIP scores on the shared images with the tiny seeded checkpoint (run once, before a refactor).

`python tests/data/record_winclip_reference.py` rewrites winclip_reference.json; tests/test_winclip_regression.py
checks that today's code still produces these numbers. Recorded before the fitting/training redesign (issue 13).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1].parent / "shared" / "datasets"
CASES = {
    "zero_shot": [],
    "two_shot": ["hazelnut_toy/hazelnut/good/00.png", "hazelnut_toy/hazelnut/good/01.png"],
}
FRAMES = ["hazelnut_toy/hazelnut/good/04.png", "hazelnut_toy/hazelnut/colour/00.png",
          "hazelnut_toy/hazelnut/colour/05.png", "mvtec_ad/grid/test/bent/000.png"]


def rgb(rel: str, size: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.open(DATA / rel).convert("RGB")
    if size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image)


def frames() -> list[np.ndarray]:
    # the grid frame is made non-square (480 x 300) so tiling and map merging are covered too
    return [rgb(FRAMES[0]), rgb(FRAMES[1]), rgb(FRAMES[2]), rgb(FRAMES[3], (480, 300))]


def summarise(amap: np.ndarray) -> dict:
    h, w = amap.shape
    ys, xs = np.linspace(0, h - 1, 5).astype(int), np.linspace(0, w - 1, 5).astype(int)
    return {"shape": [h, w], "mean": float(amap.mean()), "max": float(amap.max()),
            "samples": [float(amap[y, x]) for y in ys for x in xs]}


def record(backbone) -> dict:
    from inspectd.detectors.base import ProductSpec, create_detector
    from inspectd.detectors.pipeline import ScoreItem, run

    out: dict = {}
    for case, refs in CASES.items():
        det = create_detector("winclip", backbone)
        state = det.fit(ProductSpec("nut", "hazelnut", ("crack",)), [rgb(r) for r in refs])
        results = run([ScoreItem(det, state, image) for image in frames()])
        out[case] = [{"frame": name, "score": r.score, "map": summarise(r.map)}
                     for name, r in zip(FRAMES, results, strict=True)]
    return out


def main() -> int:
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny", image_size=240, seed=0)
        backbone = ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(ckpt), device="cpu"))
        values = record(backbone)
    (HERE / "winclip_reference.json").write_text(json.dumps(values, indent=1) + "\n")
    print(json.dumps(values)[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
