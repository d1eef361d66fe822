"""A feedback action whose files cannot all be written (a real file where a folder goes: what a full disk does to the
second of two writes), through the real console on a real Redis: it answers what failed and leaves nothing behind,
so the operator's retry saves the frame once, and a false alarm's failed copy never stays in the reference folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from inspectd.daemon.review import render_item
from inspectd.streams.schema import Frame, Result
from tests.console_helpers import DEFECTS, TOKEN, console_config, start
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis


def images(folder: Path) -> list[str]:
    """What feedback saved under ``folder`` (its names start with fb-; the references it seeds do not)."""
    return sorted(p.name for p in folder.rglob("fb-*")) if folder.exists() else []


async def kept_frame(daemon: Any, i: int) -> str:
    amap = np.zeros((64, 64), np.float32)
    amap[:16] = 1.0
    result = Result("nut", "l1", f"ng-{i}", 0.0, score=0.9, verdict="NG", threshold=0.5, detector="winclip",
                    state_version="1", mask=amap)
    frame = Frame("nut", "l1", f"ng-{i}", 0.0, payload=png_bytes(DEFECTS[i], 160))
    return await daemon.review.store.add(render_item("x", result, frame, keep_original=True, max_side=64))


async def test_an_action_whose_second_file_cannot_be_written_leaves_nothing_and_a_retry_saves_once(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    root, refs = daemon.feedback.root, tmp_path / "refs"
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post("/console/api/session", json={"token": TOKEN}) as response:
                csrf = {"X-CSRF-Token": (await response.json())["csrf"]}
            for i, (action, stray) in enumerate((({"action": "false_alarm", "target": "references"}, "good"),
                                                 ({"action": "defect", "label": "colour"}, "masks"))):
                entry_id = await kept_frame(daemon, i)
                (root / "nut").mkdir(parents=True, exist_ok=True)
                (root / "nut" / stray).write_bytes(b"")  # the image is written, then this write fails
                before, refs_before = images(root), images(refs)
                version, logged = daemon.registry.get("nut").version, len(daemon.feedback.history())
                feedback = f"/console/api/frames/{entry_id}/feedback"
                async with http.post(feedback, headers=csrf, json=action) as response:
                    assert response.status == 500, await response.text()
                    assert "nothing saved" in (await response.json())["error"]
                assert images(root) == before and images(refs) == refs_before, "a failed action left its image"
                assert daemon.registry.get("nut").version == version and len(daemon.feedback.history()) == logged
                (root / "nut" / stray).unlink()  # the operator frees the disk and tries again
                async with http.post(feedback, headers=csrf, json=action) as response:
                    assert response.status == 201, await response.text()
                    saved = [Path(f) for f in (await response.json())["feedback"]["files"]]
                assert len(saved) == 2 and all(p.exists() for p in saved)
                added = sorted(set(images(root)) - set(before)) + sorted(set(images(refs)) - set(refs_before))
                assert len(set(added)) == 1, f"the frame was saved more than once: {added}"
                await daemon.feedback.undo(daemon.feedback.history()[-1]["id"], "test")  # the next case starts clean
    finally:
        await daemon.shutdown()
