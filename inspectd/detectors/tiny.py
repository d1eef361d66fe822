"""A tiny random-weight open_clip model ("inspectd-tiny") for tests, demos and timing.

Its checkpoint is written in the Hugging Face hub layout (open_clip_config.json + safetensors) and
loaded through exactly the code path real weights take. Its scores mean nothing: the files carry a
random-weights marker, so every backbone that loads them reports ``demo_weights`` and every result says so.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from inspectd.detectors.weights import RANDOM_MARKER

TINY_ARCH = "inspectd-tiny"


def tiny_model_config(image_size: int = 240, patch_size: int = 16) -> dict[str, Any]:
    text = resources.files("inspectd.data").joinpath("models", f"{TINY_ARCH}.json").read_text()
    cfg = json.loads(text)
    cfg = copy.deepcopy(cfg)
    cfg["vision_cfg"]["image_size"] = image_size
    cfg["vision_cfg"]["patch_size"] = patch_size
    return cfg


def register_tiny_arch() -> None:
    """Make ``inspectd-tiny`` a known open_clip arch name (for ``pretrained: random`` demos)."""
    import open_clip

    if TINY_ARCH not in open_clip.list_models():
        path = resources.files("inspectd.data").joinpath("models", f"{TINY_ARCH}.json")
        with resources.as_file(path) as real_path:
            open_clip.add_model_config(real_path)


def write_tiny_checkpoint(out_dir: str | Path, image_size: int = 240, patch_size: int = 16, seed: int = 0,
                          logit_scale: float | None = None) -> Path:
    """Write a random-weight tiny CLIP as ``out_dir/{open_clip_config.json, open_clip_model.safetensors}``, both
    marked random (``weights.RANDOM_MARKER``): a backbone loading it says ``demo_weights``."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_model_config(image_size, patch_size)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.tensor(logit_scale).log()))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # marked as random weights, so whoever loads the files is told (results say demo_weights)
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={RANDOM_MARKER: "true", "seed": str(seed)})
    config = {
        RANDOM_MARKER: True,
        "model_cfg": cfg,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return out
