"""What an operator's verdict writes and changes, against a real daemon (real Redis, tiny model, the shared
hazelnut images): names from Redis never leave their folder, an undo keeps what later feedback still needs, and
the frame saved is the one the mask was drawn on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.feedback import FeedbackError, _defect_mask
from inspectd.daemon.review import ReviewItem, render_item
from inspectd.detectors.data.datasets import load_image
from inspectd.streams.codec import decode_frame_image
from inspectd.streams.schema import Frame, Result
from tests.console_helpers import DEFECTS, GOODS, console_config, send, start, wait_until
from tests.daemon_helpers import png_bytes

pytestmark = pytest.mark.redis


async def test_a_forged_original_suffix_in_redis_never_writes_outside_the_folders(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    try:
        summary = {"product": "nut", "line": "l1", "frame_id": "f", "entry_id": "", "ts": 0.0, "score": 1.0,
                   "threshold": 0.5, "verdict": "NG", "detector": "winclip", "state_version": "1",
                   "demo_weights": True, "size": [160, 160], "frame_size": [160, 160]}
        image = png_bytes(GOODS[0], 160)
        # what anyone who may write to Redis could do: a real product, an image, and a "suffix" that is a path
        # (defect: <feedback>/nut/<label>/<name>, false alarm: <refs>/<name>; both lead back to tmp_path)
        for suffix, act in (("/../../../../escape-defect.png", lambda i: daemon.feedback.defect(i, "x", "t")),
                            ("/../../escape-refs.png", lambda i: daemon.feedback.false_alarm(i, "references", "t"))):
            forged = ReviewItem("x", summary, image, b"jpg", b"jpg", None, None, original=image,
                                original_suffix=suffix)
            item = await daemon.review.fetch(await daemon.review.store.add(forged))
            assert item is not None and item.original_suffix == suffix
            try:
                record = await act(item)
            except FeedbackError:
                record = None
            assert list(tmp_path.rglob("escape*")) == [] and not list(tmp_path.parent.glob("escape*"))
            if record is not None:  # saved as a plain image name inside its folder
                assert all(Path(f).name.startswith("fb-") and Path(f).suffix == ".png" for f in record["files"])
    finally:
        await daemon.shutdown()


async def test_undoing_a_false_alarm_keeps_the_folder_a_later_false_alarm_saved_into(
        redis_url, key_prefix, tmp_path, tiny_backbone, redis_client) -> None:  # noqa: ANN001
    config = console_config(redis_url, key_prefix, tmp_path)
    refs = tmp_path / "refs"
    for i, path in enumerate(DEFECTS[:3]):  # defects, left out on purpose (shots: 2 uses 00, 01)
        (refs / f"{10 + i}.png").write_bytes(png_bytes(path, 160))
    daemon = await start(config, tiny_backbone)
    try:
        await send(redis_client, key_prefix, GOODS[2:4])
        await wait_until(lambda: len(daemon.review.items()) == 2, what="2 kept")
        second, first = daemon.review.items()
        one = await daemon.feedback.false_alarm(first, "references", "test")  # moves nut to a console copy
        two = await daemon.feedback.false_alarm(second, "references", "test")  # saved into that copy
        await daemon.feedback.undo(one["id"], "test")  # the operator takes back the first only
        entry = daemon.registry.get("nut")
        assert not {"10.png", "11.png", "12.png"} & set(entry.references), "undo switched on left-out defects"
        assert entry.references == ("00.png", "01.png", Path(two["files"][0]).name)  # the second one still used
        assert entry.config.shots == 3 and not Path(one["files"][0]).exists()
        await daemon.feedback.undo(two["id"], "test")
        entry = daemon.registry.get("nut")
        assert entry.references == ("00.png", "01.png") and entry.config.shots == 2
    finally:
        await daemon.shutdown()


def test_a_turned_phone_frame_is_kept_as_scored_so_its_defect_mask_fits_the_file() -> None:
    picture = Image.open(DEFECTS[0]).convert("RGB").resize((240, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright: decoding turns it to 160 x 240
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=95, exif=exif)
    frame = Frame("nut", "l1", "phone-1", 0.0, payload=buffer.getvalue())
    scored = decode_frame_image(frame)
    assert scored.shape[:2] == (240, 160)
    amap = np.zeros(scored.shape[:2], np.float32)
    amap[:60, :] = 1.0  # a defect across the top of the frame as scored
    result = Result("nut", "l1", "phone-1", 0.0, score=1.0, verdict="NG", threshold=0.5, detector="winclip",
                    state_version="1", mask=amap)
    item = render_item("a-1", result, frame, keep_original=True, max_side=512)
    loaded = load_image(io.BytesIO(item.original))  # the eval folder's reader: no EXIF turn
    mask = np.asarray(Image.open(io.BytesIO(_defect_mask(item.amap, 0.5, tuple(item.result["frame_size"])))))
    assert loaded.shape == scored.shape and mask.shape == scored.shape[:2]
    assert np.array_equal(loaded, scored)  # the frame as scored, losslessly
    assert mask[:60].all() and not mask[60:].any()  # the mask marks where the defect is in the saved file
