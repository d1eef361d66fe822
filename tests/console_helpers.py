"""Helpers for console tests: a daemon with http + console on a real Redis, and frames from the shared images."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from inspectd.daemon.app import InspectDaemon
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes

TOKEN = "console-test-token"
DEFECTS = sorted((HAZELNUT / "colour").glob("*.png"))
GOODS = sorted((HAZELNUT / "good").glob("*.png"))


def console_config(redis_url: str, prefix: str, tmp: Path, token: str | None = TOKEN, **console: Any) -> Any:
    """Product ``nut`` (2 references) with a threshold below every score, so its frames are NG (random weights
    score anything; a false alarm is what this test needs)."""
    (tmp / "products").mkdir(parents=True, exist_ok=True)
    config = daemon_config(
        redis_url, prefix, tmp,
        http={"enabled": True, "host": "127.0.0.1", "port": 0, "token": token,
              "token_file": str(tmp / "admin-token")},
        registry={"products_dir": str(tmp / "products"), "watch": False, "references_root": str(tmp)},
        console={"feedback_dir": str(tmp / "feedback"), "ng_per_s": 1000.0, "ok_per_s": 1000.0, **console},
        sinks={"redis": True},
    )
    nut = config.products[0]
    nut.threshold.margin = -0.5  # NG for everything close to the references' scores
    nut.mask = "full"
    return config


async def start(config: Any, backbone: Any) -> InspectDaemon:
    daemon = InspectDaemon(config, backbone=backbone)
    await daemon.start()
    return daemon


async def send(client: Any, prefix: str, paths: list[Path], product: str = "nut", line: str = "l1",
               size: int = 160, tag: str = "f") -> list[str]:
    ids = []
    for i, path in enumerate(paths):
        frame_id = f"{tag}-{path.parent.name}-{path.stem}-{i}"
        await client.xadd(f"{prefix}:{{{line}}}:frames", frame_fields(product, line, frame_id, png_bytes(path, size)))
        ids.append(frame_id)
    return ids


async def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
