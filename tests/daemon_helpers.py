"""Helpers for daemon tests: configs on a unique key prefix, frame producers, result collectors."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inspectd.daemon.config import DaemonConfig, parse_config
from inspectd.streams.message import frame_fields

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAZELNUT = DATA / "hazelnut_toy" / "hazelnut"


def png_bytes(path: Path, size: int = 96) -> bytes:
    image = Image.open(path).convert("RGB").resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def daemon_config(redis_url: str, prefix: str, tmp: Path, **overrides: Any) -> DaemonConfig:
    refs = tmp / "refs"
    refs.mkdir(exist_ok=True)
    for name in ("00.png", "01.png"):
        (refs / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
    data: dict[str, Any] = {
        "model": {"device": "cpu"},
        "redis": {"url": redis_url, "prefix": prefix, "lines": ["l1", "l2"], "block_ms": 100,
                  "claim_idle_ms": 2000, "control_stream": None},
        "batcher": {"max_batch_size": 16, "max_delay_ms": 10, "queue_size": 64},
        "http": {"enabled": False},
        "registry": {"references_root": str(tmp)},  # products PUT over the API keep their references under tmp
        "products": [
            {"id": "nut", "object_name": "hazelnut", "references": str(refs), "shots": 2},
            {"id": "grid", "object_name": "grid", "shots": 0, "mask": "none"},
        ],
        "shutdown_timeout_s": 10,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)



def one_line_config(redis_url: str, prefix: str, tmp: Path, products: list[dict[str, Any]], token: str
                    ) -> DaemonConfig:
    """A daemon on line l1 only, with the admin API on a free port behind ``token``, a state cache under ``tmp``,
    no file watcher and no control stream: what the detector lifecycle tests start."""
    return daemon_config(redis_url, prefix, tmp, http={"enabled": True, "port": 0, "token": token},
                         registry={"watch": False, "state_cache_dir": str(tmp / "cache")},
                         redis={"url": redis_url, "prefix": prefix, "lines": ["l1"], "block_ms": 50,
                                "control_stream": None},
                         batcher={"max_batch_size": 8, "max_delay_ms": 20, "queue_size": 64}, products=products)

async def send_frames(client: Any, prefix: str, n: int, start: int = 0) -> list[str]:
    """n frames alternating products nut/grid over lines l1/l2; returns the frame ids."""
    images = [png_bytes(HAZELNUT / "good" / "05.png"), png_bytes(HAZELNUT / "colour" / "03.png")]
    ids = []
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        product = "nut" if i % 2 == 0 else "grid"
        line = "l1" if i % 3 else "l2"
        frame_id = f"f{i:05d}"
        ids.append(frame_id)
        pipe.xadd(f"{prefix}:{{{line}}}:frames", frame_fields(product, line, frame_id, images[i % 2]))
        if len(pipe) >= 200:
            await pipe.execute()
    await pipe.execute()
    return ids


async def read_stream(client: Any, key: str) -> list[dict[str, str]]:
    entries = await client.xrange(key)
    out = []
    for entry_id, fields in entries:
        record = {k.decode(): (v.decode(errors="replace") if k != b"mask" else v) for k, v in fields.items()}
        record["_id"] = entry_id.decode()
        out.append(record)
    return out


async def wait_for_results(client: Any, prefix: str, n: int, timeout: float, kinds: tuple[str, ...] = ("results",)
                           ) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        records: list[dict[str, str]] = []
        for line in ("l1", "l2", "default"):
            for kind in kinds:
                records += await read_stream(client, f"{prefix}:{{{line}}}:{kind}")
        if len(records) >= n or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.1)


def random_png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
