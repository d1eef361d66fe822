"""A serving CPU daemon keeps one OpenMP team, the engine thread's: the threads that load its model and build its
products free theirs (`cpu_threads.release_team`). With more libgomp workers than cores, every team's workers spin
100 times instead of ~300 000 before they sleep, and each of torch's parallel ops has to wake them with a futex."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from inspectd.daemon.app import InspectDaemon
from inspectd.detectors import cpu_threads
from inspectd.streams.message import frame_fields
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, wait_for_results

pytestmark = pytest.mark.redis


def native_threads() -> set[int]:
    """Threads of this process that Python did not start: OpenMP's workers (and any other native ones). Tests
    compare sets: threads of earlier tests may still be ending meanwhile, so counts could fall."""
    python = {t.native_id for t in threading.enumerate()}
    return {int(tid) for tid in os.listdir("/proc/self/task")} - python


needs_teams = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or not cpu_threads.libgomp_runtimes()
                                 or torch.get_num_threads() < 2,
                                 reason="needs Linux, torch's libgomp and 2+ torch threads")


@needs_teams
def test_a_released_thread_leaves_no_openmp_worker_behind() -> None:
    def parallel_op() -> None:
        torch.randn(512, 512) @ torch.randn(512, 512)  # a 2-thread op: this thread gets a team

    keep, release = threading.Event(), threading.Event()
    for fn in (parallel_op, cpu_threads.released_team(parallel_op)):
        before = native_threads()
        worker = threading.Thread(target=lambda fn=fn: (fn(), keep.set(), release.wait()))
        worker.start()
        keep.wait()
        workers = len(native_threads() - before)
        release.set()
        worker.join()
        keep.clear()
        release.clear()
        if fn is parallel_op:
            assert workers == torch.get_num_threads() - 1  # an idle thread keeps its team's workers
        else:
            assert workers == 0


@needs_teams
async def test_a_serving_daemon_keeps_only_the_engine_threads_openmp_team(
        redis_client, redis_url, key_prefix, tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: ANN001
    config = daemon_config(redis_url, key_prefix, tmp_path, registry={"watch": False},
                           model={"arch": "inspectd-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu"})
    before = native_threads()
    daemon = InspectDaemon(config)  # loads its model on a worker thread, builds both products on the build thread
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + 120
    while not daemon.started and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert daemon.started
    image = png_bytes(HAZELNUT / "good" / "05.png")
    for i in range(4):
        await redis_client.xadd(f"{key_prefix}:{{l1}}:frames", frame_fields("nut" if i % 2 else "grid", "l1", f"f{i}",
                                                                            image))
    assert len(await wait_for_results(redis_client, key_prefix, 4, timeout=60)) == 4
    workers = len(native_threads() - before)
    daemon.request_stop()
    await asyncio.wait_for(task, 30)
    assert workers <= torch.get_num_threads() - 1  # the engine's team only (before: the loader's and builder's too)


@needs_teams
def test_the_openmp_benchmark_runs_and_compares_one_team_with_two() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench.openmp", "--rounds", "1", "--seconds", "0.3"], check=True,
                         capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[1]).stdout
    assert "one team " in out and "an idle second team" in out and "x" in out.splitlines()[-1]
