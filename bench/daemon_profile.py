"""Where the daemon's end-to-end time goes beyond the engine's: one saturated run through Redis at a batch limit
(default 1), with the daemon's own per-stage timings, torch.profiler over the torch ops of every thread, and
cProfile over the event-loop thread (Redis client, asyncio, publishing), beside the engine-only run of bench/daemon.py.

    python -m bench.daemon_profile [--batch 1] [--frames 200] [--arch inspectd-tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import resource
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.daemon import collect, config, engine_only, frames, produce, start_daemon, stop_daemon
from inspectd.daemon.app import InspectDaemon, build_backbone
from inspectd.detectors import cpu_threads


def stage_sums(daemon: InspectDaemon) -> dict[str, tuple[float, float]]:
    """stage -> (seconds summed over frames, frames observed) from the daemon's stage_duration histogram."""
    sums: dict[str, list[float]] = {}
    for metric in daemon.metrics.stage_duration.collect():
        for sample in metric.samples:
            stage = sample.labels.get("stage")
            if stage is None:
                continue
            entry = sums.setdefault(stage, [0.0, 0.0])
            if sample.name.endswith("_sum"):
                entry[0] += sample.value
            elif sample.name.endswith("_count"):
                entry[1] += sample.value
    return {k: (v[0], v[1]) for k, v in sums.items()}


async def redis_cpu_s(client: Any) -> float:
    """CPU seconds the Redis server has used (user + sys): it shares this machine's cores."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def profile_run(arch: str, batch: int, n: int, size: int, threads: int = 0, profilers: bool = True
                      ) -> dict[str, Any]:
    backbone = build_backbone(config(arch, 1, "x"))
    cpu_threads.use_threads(threads)
    daemon, task, client, prefix = await start_daemon(arch, batch, backbone)
    payloads = frames(n, size)
    frames_key, results_key = f"{prefix}:{{b}}:frames", f"{prefix}:{{b}}:results"
    engine_only(daemon, payloads[:20], batch)  # warm-up of both paths
    await produce(client, frames_key, payloads[:20], None)
    await collect(client, results_key, 20)
    engine_rate = max(engine_only(daemon, payloads, batch) for _ in range(3))
    cpu_threads.release_team()  # this thread's OpenMP team: the engine thread's must be the only one from here
    loop = asyncio.get_running_loop()
    engine_thread = daemon.engine._engine  # the daemon's one forward thread
    thread_rate = max([await loop.run_in_executor(engine_thread, engine_only, daemon, payloads, batch)
                       for _ in range(2)])
    alone = profile(activities=[ProfilerActivity.CPU])
    if profilers:  # the same engine-only pass once more, profiled on the engine thread, for an op-by-op comparison
        await loop.run_in_executor(engine_thread, alone.start)
        await loop.run_in_executor(engine_thread, engine_only, daemon, payloads, batch)
        await loop.run_in_executor(engine_thread, alone.stop)
    await client.delete(results_key)
    before = stage_sums(daemon)
    await produce(client, frames_key, payloads, None)  # saturation: every frame waiting before the clock starts
    loop_profile = cProfile.Profile()
    # torch.profiler records the thread it is started on: start and stop it on the engine's one worker thread
    torch_profile = profile(activities=[ProfilerActivity.CPU])
    if profilers:
        await loop.run_in_executor(engine_thread, torch_profile.start)
    redis_cpu = await redis_cpu_s(client)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profilers:
        loop_profile.enable()
    await collect(client, results_key, n)
    if profilers:
        loop_profile.disable()
    wall = time.perf_counter() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    redis_cpu = await redis_cpu_s(client) - redis_cpu
    if profilers:
        await loop.run_in_executor(engine_thread, torch_profile.stop)
    after = stage_sums(daemon)
    await stop_daemon(daemon, task, client, prefix)
    stages = {stage: (after[stage][0] - before.get(stage, (0.0, 0.0))[0]) / max(1.0, after[stage][1]
              - before.get(stage, (0.0, 0.0))[1]) for stage in after}
    stream = io.StringIO()
    busy = None
    if profilers:
        stats = pstats.Stats(loop_profile, stream=stream)
        stats.sort_stats("tottime").print_stats(int(os.environ.get("BENCH_PROFILE_ROWS", "15")))
        idle = sum(tt for (_, _, name), (_, _, tt, _, _) in stats.stats.items() if "epoll" in name)
        busy = 1000 * (stats.total_tt - idle) / n
    process_cpu = (used.ru_utime + used.ru_stime) - (usage.ru_utime + usage.ru_stime)
    events = torch_profile.key_averages() if profilers else []
    alone_ms = {e.key: e.self_cpu_time_total / 1e3 / n for e in alone.key_averages()} if profilers else {}
    torch_total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"batch": batch, "frames": n, "engine_ms": 1000 / engine_rate, "e2e_ms": 1000 * wall / n,
            "engine_thread_ms": 1000 / thread_rate,
            "stages_ms": {k: 1000 * v for k, v in sorted(stages.items())},
            "torch_ms": 1000 * torch_total / n, "loop_busy_ms": busy,
            "process_cpu_ms": 1000 * process_cpu / n, "redis_cpu_ms": 1000 * redis_cpu / n,
            "threads": torch.get_num_threads(),
            "torch_top": [(e.key, e.self_cpu_time_total / 1e3 / n, e.count / n, alone_ms.get(e.key, 0.0)) for e in top],
            "torch_alone_ms": sum(alone_ms.values()),
            "loop_profile": stream.getvalue()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="inspectd-tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the backbone's choice, all cores)")
    parser.add_argument("--no-profilers", action="store_true", help="stage timings and CPU use only (no overhead)")
    parser.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (GIL hand-over)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    r = asyncio.run(profile_run(args.arch, args.batch, args.frames, args.size, args.threads, not args.no_profilers))
    print(f"{args.arch}, batch limit {r['batch']}, {r['frames']} frames, torch threads {r['threads']}")
    print(f"engine-only {r['engine_ms']:.2f} ms/frame; end-to-end {r['e2e_ms']:.2f} ms/frame "
          f"(ratio {r['engine_ms'] / r['e2e_ms']:.2f}); engine-only on the daemon's engine thread, event loop idle: "
          f"{r['engine_thread_ms']:.2f} ms/frame")
    loop_busy = "" if r["loop_busy_ms"] is None else \
        f" (of which the event loop's Python, outside epoll, {r['loop_busy_ms']:.2f} ms)"
    print(f"CPU per frame during the end-to-end run: this process {r['process_cpu_ms']:.2f} ms{loop_busy}, Redis "
          f"server {r['redis_cpu_ms']:.2f} ms; the cores offer {r['e2e_ms'] * os.cpu_count():.2f} ms per frame")
    print("daemon stage timings, ms per frame: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms"].items()))
    print(f"torch ops on the engine thread (self CPU): {r['torch_ms']:.2f} ms/frame in the daemon, "
          f"{r['torch_alone_ms']:.2f} ms/frame engine-only on the same thread; top (daemon / engine-only):")
    for name, ms, count, alone in r["torch_top"]:
        print(f"  {name:50s} {ms:7.3f} / {alone:7.3f} ms/frame  {count:5.1f} calls/frame")
    print("event-loop thread (cProfile, tottime):")
    print(r["loop_profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
