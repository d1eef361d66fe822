"""The console's config keys: typed and validated at load with the key named; `run --check` sees a bad folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspectd.daemon.checks import check_config
from inspectd.daemon.config import ConfigError, parse_config


@pytest.mark.parametrize(("console", "key"), [
    ({"review": "disk"}, "console.review"), ({"keep_ng": -1}, "console.keep_ng"),
    ({"max_side": 0}, "console.max_side"), ({"keep_ok": "many"}, "console.keep_ok"),
    ({"verdicts": ["NG"]}, "console.verdicts"),
])
def test_bad_console_settings_name_their_key(console: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"console": console})
    assert str(err.value).startswith(f"config error at {key}")


def test_check_names_a_feedback_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "fb").write_text("not a folder")
    config = parse_config({"console": {"feedback_dir": str(tmp_path / "fb")}, "model": {"pretrained": "random"},
                           "demo": True})
    problems = check_config(config, products=False)
    assert any(p.startswith("console.feedback_dir:") for p in problems), problems
    config.console.feedback_dir = str(tmp_path / "new" / "fb")  # created on first feedback: fine
    assert not any(p.startswith("console.") for p in check_config(config, products=False))


def test_originals_stay_within_their_byte_budget_oldest_first() -> None:
    from inspectd.daemon.config import ConsoleConfig
    from inspectd.daemon.review import ReviewHub, ReviewItem

    hub = ReviewHub(ConsoleConfig(keep_ng=10, original_budget_mb=1))
    items = [ReviewItem(str(i), {"verdict": "NG", "product": "p", "line": "l"}, b"", b"", b"", None, None,
                        original=bytes(400 * 1024)) for i in range(4)]
    for item in items:
        hub._keep(item)
    assert [i.original is not None for i in items] == [False, False, True, True]  # 2 x 400 KiB fit in 1 MiB
    assert hub._original_bytes == 2 * 400 * 1024
    for i in range(4, 14):  # eviction from the buffer releases the bytes too
        hub._keep(ReviewItem(str(i), {"verdict": "NG", "product": "p", "line": "l"}, b"", b"", b"", None, None))
    assert hub._original_bytes == 0 and len(hub._items) == 10


def test_frames_evicted_from_the_review_buffer_are_freed() -> None:
    """`_keep` dropped an evicted frame's original but left the frame in the originals' queue, which was only
    trimmed from its front: one NG frame at the front (NG is rare on a line) kept every later OK frame's pictures
    and float mask alive (575 MB after 300 frames of 512 px), outside the byte budget."""
    import gc
    import weakref

    import numpy as np

    from inspectd.daemon.config import ConsoleConfig
    from inspectd.daemon.review import ReviewHub, ReviewItem

    hub = ReviewHub(ConsoleConfig(keep_ng=100, keep_ok=20))

    def item(i: int, verdict: str) -> ReviewItem:
        return ReviewItem(str(i), {"verdict": verdict, "product": "p", "line": "l"}, b"png", b"jpg", b"jpg",
                          np.zeros((64, 64), np.float32), None, original=bytes(1024))

    hub._keep(item(0, "NG"))
    refs = []
    for i in range(1, 301):
        ok = item(i, "OK")
        refs.append(weakref.ref(ok))
        hub._keep(ok)
        del ok
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive == 20 and len(hub._items) == 21  # the 20 OK frames kept, nothing else
    assert hub._original_bytes == 21 * 1024
