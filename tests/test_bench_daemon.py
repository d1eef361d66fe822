"""bench/daemon.py's saturated end-to-end rate, read from result entries' own times in a real Redis."""

from __future__ import annotations

import pytest

from bench.daemon import saturated_rate

pytestmark = pytest.mark.redis


async def test_the_rate_counts_the_results_after_the_first_batch_over_redis_own_entry_times(
        redis_client, key_prefix) -> None:  # noqa: ANN001
    key = f"{key_prefix}:results"
    # 3 batches of 4 results, written 100 ms apart (ids are Redis's ms times); the first batch ends the warm-up
    for batch, ms in enumerate((1_000_000, 1_000_100, 1_000_200)):
        for i in range(4):
            await redis_client.xadd(key, {"frame": f"{batch}-{i}"}, id=f"{ms + (i == 3)}-{i}")
    # 8 results after the first batch, from its results to the last one (1 ms into its batch)
    assert await saturated_rate(redis_client, key, 12, batch=4, timeout=5) == pytest.approx(8 / 0.201)


async def test_single_frame_batches_are_each_their_own_batch_even_within_a_millisecond(
        redis_client, key_prefix) -> None:  # noqa: ANN001
    key = f"{key_prefix}:results"
    for i in range(5):  # batch limit 1, a result each 1 ms (a fast GPU): only the first is the first batch
        await redis_client.xadd(key, {"frame": str(i)}, id=f"{2_000_000 + i}-0")
    assert await saturated_rate(redis_client, key, 5, batch=1, timeout=5) == pytest.approx(4 / 0.004)


async def test_too_few_results_or_too_few_batches_give_no_rate(redis_client, key_prefix) -> None:  # noqa: ANN001
    key = f"{key_prefix}:results"
    for i in range(3):
        await redis_client.xadd(key, {"frame": str(i)}, id=f"3000000-{i}")
    with pytest.raises(TimeoutError, match="3 of 4 results"):
        await saturated_rate(redis_client, key, 4, batch=4, timeout=0.2)
    with pytest.raises(ValueError, match="too few frames"):  # all in the first batch
        await saturated_rate(redis_client, key, 3, batch=4, timeout=1)


async def test_the_camera_row_scores_1080p_jpegs_through_the_daemon_and_the_engine_alike() -> None:
    """The GPU report's camera row, here on the CPU with the tiny model: 1080p JPEGs under model.resize fast, both
    sides decoding them as the engine does (smaller)."""
    from bench.daemon import build_backbone, camera_frames, config, measure

    payloads = camera_frames(3)
    assert len(payloads) == 3 and all(p[:2] == b"\xff\xd8" for p in payloads)  # JPEG
    backbone = build_backbone(config("inspectd-tiny", 1, "x", resize="fast"))
    assert backbone.spec.resize == "fast"
    row = await measure("inspectd-tiny", 4, 12, 240, backbone, 0, camera=True)
    assert row["engine"] > 0 and row["e2e"] > 0 and 0.2 < row["ratio"] < 5
    assert 1 <= row["mean_batch"] <= 4 and row["p99@50%"] >= row["p50@50%"] > 0


async def test_the_window_can_open_after_the_producer_so_its_xadds_are_not_inside(
        redis_client, key_prefix) -> None:  # noqa: ANN001
    key = f"{key_prefix}:results"
    # 6 batches of 2: slow while the producer was adding frames (until 1_000_350), fast after it
    for batch, ms in enumerate((1_000_000, 1_000_200, 1_000_400, 1_000_450, 1_000_500, 1_000_550)):
        for i in range(2):
            await redis_client.xadd(key, {"frame": f"{batch}-{i}"}, id=f"{ms}-{i}")
    opened: list[str] = []
    # opens at the batch at 1_000_400: 6 results after it in 150 ms
    assert await saturated_rate(redis_client, key, 12, batch=2, timeout=5, opens_ms=1_000_350, opened=opened) == \
        pytest.approx(6 / 0.15)
    assert await saturated_rate(redis_client, key, 12, batch=2, timeout=5, opened=opened) == pytest.approx(10 / 0.55)
    # the daemon kept up with the producer: under a quarter of the results, or one batch, after it
    for opens_ms in (1_000_501, 1_000_551):
        assert await saturated_rate(redis_client, key, 12, batch=2, timeout=5, opens_ms=opens_ms, opened=opened) \
            == pytest.approx(10 / 0.55)
    assert opened == ["after the producer", "at the first batch", "at the first batch", "at the first batch"]
