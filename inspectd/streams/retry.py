"""The one backoff policy every reconnect and retry loop uses (redis-py's jittered exponential backoff).

``Backoff.wait()`` sleeps 0.1 s, 0.2 s, 0.4 s ... up to 5 s (with jitter from redis-py's policy) over
consecutive failures; ``reset()`` after a success starts again from the shortest wait.
"""

from __future__ import annotations

import asyncio

from redis.backoff import EqualJitterBackoff

CAP_S = 5.0
BASE_S = 0.1


class Backoff:
    """Consecutive-failure counter with redis-py's jittered exponential backoff."""

    def __init__(self, cap: float = CAP_S, base: float = BASE_S) -> None:
        self.policy = EqualJitterBackoff(cap=cap, base=base)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return self.policy.compute(self.failures)

    async def wait(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.failures = 0
