"""The embedded default: a daemon that needs no external service and no downloaded weights.

It watches a folder of images (in place; processed files are recorded in a ledger, never moved),
scores them with WinCLIP+ on the tiny random-weight model, and writes JSONL results, mask PNGs and
Prometheus metrics. Random weights: every result is flagged ``demo_weights`` and the log says the
scores are meaningless. With real weights, point a config file at them instead (README).
"""

from __future__ import annotations

from pathlib import Path

from inspectd.daemon.config import ConfigError, DaemonConfig, parse_config

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "hazelnut_toy" / "hazelnut"
DEFAULT_INPUT = SHARED / "colour"
DEFAULT_REFERENCES = SHARED / "good"


def demo_config(input_dir: str | Path | None = None, references: str | Path | None = None,
                out_dir: str | Path = "runs/demo", port: int = 9464) -> DaemonConfig:
    for what, path, flag in (("images to score", input_dir or DEFAULT_INPUT, "--input"),
                             ("good reference images", references or DEFAULT_REFERENCES, "--references")):
        if not Path(path).is_dir():
            raise ConfigError("demo", f"no {what} at {path}: pass {flag} DIR (the default needs ../shared/datasets "
                                      "beside the checkout)")
    out = Path(out_dir).resolve()
    (out / "references").mkdir(parents=True, exist_ok=True)  # the console's false alarms land here, never in shared/
    return parse_config({
        "demo": True,
        "model": {"arch": "inspectd-tiny", "pretrained": "random", "device": "cpu"},
        "sources": {"redis": False, "folders": [{
            "path": str(Path(input_dir or DEFAULT_INPUT).resolve()), "product": "hazelnut", "line": "demo",
            "after": "record", "ledger": str(out / "processed.jsonl"), "poll_interval_s": 0.2}]},
        "sinks": {"redis": False, "jsonl": str(out / "results.jsonl"), "jsonl_masks_dir": str(out / "masks")},
        "http": {"port": port},
        "registry": {"state_cache_dir": str(out / "state-cache"), "watch": False,
                     "references_root": str(out / "references")},
        "console": {"feedback_dir": str(out / "feedback")},
        "products": [{"id": "hazelnut", "object_name": "hazelnut",
                      "references": str(Path(references or DEFAULT_REFERENCES).resolve()), "shots": 4,
                      "mask": "downscaled:256"}],
    })


def is_demo(config: DaemonConfig) -> bool:
    return config.demo
