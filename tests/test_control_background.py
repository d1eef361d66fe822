"""The fleet control stream never waits for a build: a slow product's rebuild runs in the background while later
commands (another product's reload, a put, a delete) apply; failures are still counted; shutdown stops it all."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.detectors.base import ProductSpec, ProductState, register_detector
from inspectd.detectors.context import FitContext
from inspectd.detectors.winclip import WinClip
from tests.daemon_helpers import daemon_config

pytestmark = pytest.mark.redis

GATES: dict[str, threading.Event] = {}  # product id -> its builds block in fit until set (none: they pass at once)
ENTERED: dict[str, int] = {}  # product id -> how many gated fits began


@register_detector
class GatedWinClip(WinClip):
    """A detector whose build is as slow as the test wants: fit holds while its product's gate is shut (and stops
    as a long training fit does, at the next check, when the build is superseded or removed)."""

    name = "test-gated-build"

    def fit(self, spec: ProductSpec, references: Sequence[np.ndarray], ctx: FitContext | None = None) -> ProductState:
        gate = GATES.get(spec.product)
        if gate is not None and ctx is not None:
            ENTERED[spec.product] = ENTERED.get(spec.product, 0) + 1
            while not gate.wait(0.02):
                ctx.check_stop()
        return super().fit(spec, references, ctx)


@pytest.fixture
def gates() -> Iterator[dict[str, threading.Event]]:
    yield GATES
    for gate in GATES.values():
        gate.set()  # never leave a build thread blocked
    GATES.clear()
    ENTERED.clear()


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def control_config(redis_url: str, prefix: str, tmp: Path, stream: str) -> Any:
    return daemon_config(
        redis_url,
        prefix,
        tmp,
        sources={"redis": False},
        sinks={"redis": False},
        redis={"url": redis_url, "prefix": prefix, "control_stream": stream},
        registry={"watch": False},
        products=[
            {"id": "slow", "object_name": "hazelnut", "detector": "test-gated-build", "shots": 0, "mask": "none"},
            {"id": "fast", "object_name": "grid", "shots": 0, "mask": "none"},
        ],
    )


async def test_a_slow_build_never_holds_up_the_next_control_command(
    redis_client, redis_url, key_prefix, tmp_path, tiny_backbone, gates, caplog
) -> None:
    caplog.set_level(logging.INFO)
    stream = f"{key_prefix}:control"
    daemon = InspectDaemon(control_config(redis_url, key_prefix, tmp_path, stream), backbone=tiny_backbone)
    await daemon.start()
    try:
        registry, control = daemon.registry, daemon.control
        assert registry.get("slow").version == 1 and registry.get("fast").version == 1
        gate = gates["slow"] = threading.Event()

        await redis_client.xadd(stream, {"op": "reload", "product": "slow"})
        await until(lambda: ENTERED.get("slow") == 1, 10, "the slow rebuild to start")
        await redis_client.xadd(stream, {"op": "reload", "product": "fast"})
        await until(lambda: registry.get("fast").version == 2, 10, "the fast reload behind the slow build")
        assert registry.progress("slow") is not None and registry.get("slow").version == 1  # still building

        # a second reload of the product that builds: the registry's rule, as for the admin API (the newer one
        # stops the running build and builds instead); a superseded command is no error
        await redis_client.xadd(stream, {"op": "reload", "product": "slow"})
        await until(lambda: ENTERED.get("slow") == 2, 10, "the second slow rebuild to start")
        assert registry.get("slow").version == 1
        gate.set()
        await until(
            lambda: registry.get("slow").version == 2 and registry.progress("slow") is None,
            10,
            "the newest slow rebuild",
        )
        await until(lambda: control.pending() == 0, 5, "the control jobs to end")
        assert control.errors == 0 and control.applied == 2 and control.superseded == 1

        # a failing background build is logged and counted, as an inline one was
        await redis_client.xadd(
            stream,
            {"op": "put", "product": "fast", "config": '{"object_name": "grid", "shots": 2, "references": "/no/such"}'},
        )
        await until(lambda: control.errors == 1, 10, "the rejected put")
        assert registry.get("fast").version == 2
        assert 'inspectd_errors_total{kind="control"} 1.0' in daemon.metrics.exposition().decode()
        assert "does not exist" in caplog.text

        # stream order holds per product: a put still building, then a delete: the product is gone for good
        gate.clear()
        await redis_client.xadd(
            stream,
            {
                "op": "put",
                "product": "slow",
                "config": '{"object_name": "hazelnut", "detector": "test-gated-build", '
                '"shots": 0, "mask": "none", "seed": 7}',
            },
        )
        await redis_client.xadd(stream, {"op": "delete", "product": "slow"})
        await until(lambda: registry.get("slow") is None, 10, "the delete behind the put")
        gate.set()
        await until(lambda: control.pending() == 0, 5, "the control jobs to end")
        await asyncio.sleep(0.2)
        assert registry.get("slow") is None and registry.status("slow") is None
        assert control.errors == 1 and control.applied == 3

        # shutdown while a build runs: the spawned job is cancelled and awaited, nothing is left behind
        gate.clear()
        entered = ENTERED.get("slow", 0)
        await redis_client.xadd(
            stream,
            {
                "op": "put",
                "product": "slow",
                "config": '{"object_name": "hazelnut", "detector": "test-gated-build", "shots": 0, "mask": "none"}',
            },
        )
        await until(lambda: control.pending() == 1 and ENTERED.get("slow") == entered + 1, 10, "a build to hang")
    finally:
        started = time.monotonic()
        await daemon.shutdown()
        for gate in gates.values():
            gate.set()
    assert time.monotonic() - started < 5
    assert daemon.control.pending() == 0
    assert "exception was never retrieved" not in caplog.text
