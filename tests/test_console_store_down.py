"""The console with `console.review: redis` while that Redis is down: the products' panel still answers, the
review-store routes say 503 in JSON (with the security headers), nothing is aiohttp's bare 500 page."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.console_helpers import GOODS, console_config, send, start, wait_until

pytestmark = [pytest.mark.redis,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_the_console_keeps_its_products_panel_when_the_review_store_is_down(tmp_path: Path,
                                                                                  tiny_backbone) -> None:
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.ping()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.05)
        daemon = await start(console_config(url, "cs", tmp_path, token=None, review="redis"), tiny_backbone)
        try:
            await send(client, "cs", GOODS[:2])
            await wait_until(lambda: daemon.review.stats.get("nut") and daemon.review.stats["nut"].scored >= 2, 60,
                             "two frames scored")
            async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}") as http:
                server.terminate()
                server.wait(10)
                async with http.get("/console/api/overview") as response:
                    body = await response.json()
                assert response.status == 200, body  # (a 500 before: the whole console failed to start)
                assert [p["id"] for p in body["products"]] == ["grid", "nut"]
                assert body["review"]["kept"] is None and "ConnectionError" in body["review"]["store_error"]
                async with http.get("/console/api/frames") as response:
                    body = await response.json()
                    headers = response.headers
                assert response.status == 503 and "review store is unavailable" in body["error"]
                assert "Content-Security-Policy" in headers
        finally:
            await daemon.shutdown()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)
        await client.aclose()
