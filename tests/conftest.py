"""Shared fixtures: a real Redis server (started here when none is reachable), paths to shared data."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server: $INSPECTD_TEST_REDIS_URL, the machine's on 6379, or one started for this session."""
    import os

    if os.environ.get("INSPECTD_TEST_REDIS_URL"):
        yield os.environ["INSPECTD_TEST_REDIS_URL"]
        return
    if _port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no Redis server on 127.0.0.1:6379 and no redis-server binary to start one")
    port = 6399
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if _port_open("127.0.0.1", port):
            break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def key_prefix() -> str:
    """A unique key prefix so tests never see each other's streams."""
    return f"test:{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis_client(redis_url: str, key_prefix: str) -> AsyncIterator[object]:
    """An asyncio Redis client; deletes the test's keys afterwards."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
    keys += [k async for k in client.scan_iter(match=f"*{{{key_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny open_clip checkpoint folder (240 px, 15x15 patches), written at test time."""
    from inspectd.detectors.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-clip"), image_size=240, seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_checkpoint: Path):
    """The tiny checkpoint loaded through the real loading path, on CPU in fp32."""
    from inspectd.detectors.backbone import ClipBackbone, ModelSpec

    return ClipBackbone(ModelSpec(arch="inspectd-tiny", pretrained=str(tiny_checkpoint), device="cpu"))
