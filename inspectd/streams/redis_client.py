"""How the daemon connects to Redis: one client, plain or Cluster, whose socket timeout outlasts its longest
blocking read (redis-py's default of 5 s would cut a longer ``XREADGROUP BLOCK`` off mid-wait)."""

from __future__ import annotations

from typing import Any

SOCKET_MARGIN_S = 5.0  # beyond the longest BLOCK: a reply this late means the connection is gone (half-open TCP)


def socket_timeout_s(block_ms: int) -> float:
    """Seconds a read may wait for Redis's reply when reads block up to ``block_ms`` (at least redis-py's 5 s)."""
    return max(SOCKET_MARGIN_S, block_ms / 1000.0 + SOCKET_MARGIN_S)


def redis_client(url: str, cluster: bool, block_ms: int) -> Any:
    """``redis.asyncio.Redis`` for ``url``, or with ``cluster`` a ``RedisCluster`` that discovers the cluster from
    the one node the URL names (its pipelines split per node)."""
    timeout = socket_timeout_s(block_ms)
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, socket_timeout=timeout)
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=timeout)
