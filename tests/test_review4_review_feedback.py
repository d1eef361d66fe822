"""A confirmed defect's mask from an item read back from Redis, through the real console (real daemon, real Redis,
the shared images): its size is the saved image's, whatever size the item claims, and an item whose image cannot be
read saves nothing."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.review import ReviewItem
from tests.console_helpers import DEFECTS, TOKEN, console_config, start
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis


def summary(**sizes: Any) -> dict[str, Any]:
    return {"product": "nut", "line": "l1", "frame_id": "f", "entry_id": "", "ts": 0.0, "score": 1.0,
            "threshold": 0.5, "verdict": "NG", "detector": "winclip", "state_version": "1", "demo_weights": True,
            **sizes}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a few dozen bytes: what a forged value costs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def written(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "good" not in p.parts)


async def test_a_defects_mask_fits_the_saved_image_whatever_size_the_item_in_redis_claims(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    amap = np.zeros((96, 96), np.float32)
    amap[:24] = 1.0  # a defect across the top quarter
    original, review_image = png_bytes(DEFECTS[0], 160), png_bytes(DEFECTS[0], 96)
    cases = [  # (what is saved, the summary's sizes): forged, or from a version that wrote them otherwise
        (original, {"size": [96, 96], "frame_size": [4000, 3000]}),
        (None, {"size": [5000, 5000], "frame_size": [160, 160]}),
        (original, {"size": [96, 96], "frame_size": [60000, 60000]}),  # 3.6 GB of mask before
    ]
    root = daemon.feedback.root
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post("/console/api/session", json={"token": TOKEN}) as response:
                csrf = {"X-CSRF-Token": (await response.json())["csrf"]}
            for saved, sizes in cases:
                item = ReviewItem("x", summary(**sizes), review_image, b"jpg", b"jpg", None, amap, original=saved)
                entry_id = await daemon.review.store.add(item)
                async with http.post(f"/console/api/frames/{entry_id}/feedback", headers=csrf,
                                     json={"action": "defect", "label": "colour"}) as response:
                    assert response.status == 201, await response.text()
                    image_path, mask_path = map(Path, (await response.json())["feedback"]["files"])
                image = Image.open(image_path)
                mask = np.asarray(Image.open(mask_path))
                assert mask.shape == (image.height, image.width) == ((160, 160) if saved else (96, 96)), sizes
                rows = mask.shape[0] // 4
                assert mask[:rows].all() and not mask[rows:].any()  # where the defect is in the saved image

            for saved in (b"not an image", png_header_only(100_000, 100_000)):  # no image / a bomb's header
                before = written(root)
                item = ReviewItem("x", summary(size=[96, 96], frame_size=[160, 160]), review_image, b"jpg",
                                  b"jpg", None, amap, original=saved)
                entry_id = await daemon.review.store.add(item)
                for _ in range(2):  # refused, and the frame is not left claimed
                    async with http.post(f"/console/api/frames/{entry_id}/feedback", headers=csrf,
                                         json={"action": "defect", "label": "colour"}) as response:
                        assert response.status == 422, await response.text()
                assert written(root) == before, "a refused defect left files behind"
    finally:
        await daemon.shutdown()
