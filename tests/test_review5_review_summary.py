"""Feedback on a frame whose summary in Redis lacks fields its record needs (another version's entry, or one anyone who
may write to Redis wrote), through the real console on a real Redis: refused with a 422 before anything is written,
never a 500 with the frame's image left behind in the product's folders."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np
import pytest

from inspectd.daemon.review import ReviewItem
from tests.console_helpers import DEFECTS, TOKEN, console_config, start
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis

SUMMARY = {"product": "nut", "line": "l1", "frame_id": "f", "entry_id": "", "ts": 0.0, "score": 1.0,
           "threshold": 0.5, "verdict": "NG", "detector": "winclip", "state_version": "1", "demo_weights": True,
           "size": [96, 96], "frame_size": [160, 160]}


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and p.suffix == ".png"}


CASES = [  # (the action, the summary's fields changed; None: left out)
    ({"action": "defect", "label": "colour"}, {"state_version": None}),
    ({"action": "defect", "label": "colour"}, {"entry_id": None}),
    ({"action": "defect", "label": "colour"}, {"threshold": "0.5"}),
    ({"action": "false_alarm", "target": "references"}, {"score": None}),
    ({"action": "false_alarm", "target": "holdout"}, {"state_version": None}),
]


async def test_feedback_on_a_summary_lacking_fields_writes_nothing_and_answers_422(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    amap = np.zeros((96, 96), np.float32)
    image = png_bytes(DEFECTS[0], 96)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post("/console/api/session", json={"token": TOKEN}) as response:
                csrf = {"X-CSRF-Token": (await response.json())["csrf"]}
            for action, broken in CASES:
                summary = {k: v for k, v in {**SUMMARY, **broken}.items() if v is not None}
                entry_id = await daemon.review.store.add(ReviewItem("x", summary, image, b"jpg", b"jpg", None, amap,
                                                                    original=png_bytes(DEFECTS[0], 160)))
                before, version = files(tmp_path), daemon.registry.get("nut").version
                for _ in range(2):  # refused, and the frame is not left claimed
                    async with http.post(f"/console/api/frames/{entry_id}/feedback", headers=csrf,
                                         json=action) as response:
                        assert response.status == 422, (action, broken, await response.text())
                assert files(tmp_path) == before, f"a refused action left images behind ({action}, {broken})"
                assert daemon.registry.get("nut").version == version and daemon.feedback.history() == []
    finally:
        await daemon.shutdown()
