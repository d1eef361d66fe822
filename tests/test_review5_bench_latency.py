"""bench/daemon.py's latency at load: its producer offers frames open loop at the stated rate, and each frame's
latency starts when it was due, even where the event loop it shares with the daemon held the producer back."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.daemon import produce

pytestmark = pytest.mark.redis

RATE = 2000.0  # frames/s: GPU-rate rows offer thousands a second


async def test_frames_are_stamped_and_sent_on_schedule_through_a_stall_of_the_shared_loop(
        redis_client, key_prefix) -> None:  # noqa: ANN001
    key, n = f"{key_prefix}:{{b}}:frames", 300
    # the daemon's work on the same loop, modelled as one 100 ms stall 30 ms into the run
    asyncio.get_running_loop().call_later(0.03, time.sleep, 0.1)
    await produce(redis_client, key, [b"x" * 64] * n, rate=RATE)
    entries = await redis_client.xrange(key)
    assert len(entries) == n
    stamps = [float(fields[b"ts"]) for _, fields in entries]
    # every frame's ts is when it was due: frames due during the stall still start their latency then
    late = max(abs(ts - stamps[0] - i / RATE) for i, ts in enumerate(stamps))
    assert late < 0.002, f"a frame's stamp is {late * 1000:.0f} ms off its schedule"
    # and they reached Redis at the offered rate, the backlog of the stall sent at once, not one round trip each
    arrived = int(entries[-1][0].split(b"-")[0]) / 1000.0
    assert arrived - stamps[-1] < 0.1, f"the last frame reached Redis {arrived - stamps[-1]:.2f} s after it was due"
