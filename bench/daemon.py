"""Daemon overhead and latency, measured in one run against the real Redis on 127.0.0.1:6379:

- engine-only throughput (the same decode + scoring on the daemon's engine thread, no Redis) vs end-to-end
  throughput through Redis (XADD -> daemon -> XADD results -> XACK); overhead target < 5 %;
- p50/p99 end-to-end latency with producers at 50 % and 90 % of the measured saturation rate;
- the mean batch size the micro-batcher formed; for batch limits 1, 4 and 16.

    python -m bench.daemon [--arch inspectd-tiny] [--frames 300] [--size 240]

Default model: the tiny random one with WinCLIP windows (fast, so Redis overhead is most visible);
``--arch ViT-B-16-plus-240`` measures the paper's backbone (slow on a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
import uuid

import numpy as np
import redis.asyncio as aioredis
import torch
from PIL import Image

from inspectd import allocator
from inspectd.daemon.app import InspectDaemon, build_backbone
from inspectd.daemon.config import parse_config
from inspectd.daemon.engine import PreparedFrame, ScoringEngine
from inspectd.detectors import cpu_threads
from inspectd.detectors.base import Detector, ProductState
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.streams.message import frame_fields
from inspectd.streams.schema import Frame

REDIS = "redis://127.0.0.1:6379/0"
FIRST_BATCH_MS = 2  # a batch's results are added in one pipeline, within a ms or two (capped at the batch limit)
PRODUCE_CHUNK = 16  # frames per XADD round trip when the producer fills a backlog
REPEATS = 7  # alternations of engine-only and end-to-end; the ratio is the median of the adjacent pairs' ratios
# (7, not 5: this VM's slow spells last seconds, and one quick run's pairs spread from 0.54 to 1.10)


ALLOCATOR = "keep"  # the daemons' `allocator` (--allocator system: glibc's defaults, for a before/after)
CAMERA = (1920, 1080)  # the camera-frame rows: 1080p JPEG photos (quality 90)


def frames(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(n, 16)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return [out[i % len(out)] for i in range(n)]


def camera_frames(n: int, size: tuple[int, int] = CAMERA) -> list[bytes]:
    """``n`` JPEG frames of a camera's size (hazelnut_toy photos scaled up, 8 distinct): what a line sends."""
    from bench.sweeps import photos

    out = []
    for image in photos("colour", min(n, 8), size):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return [out[i % len(out)] for i in range(n)]


def config(arch: str, batch: int, prefix: str, decode_threads: int = -1, precision: str = "auto",  # noqa: ANN201
           device: str = "auto", resize: str = "exact"):
    return parse_config({
        "decode": {"threads": decode_threads},
        "demo": True, "model": {"arch": arch, "pretrained": "random", "precision": precision, "device": device,
                                "resize": resize},
        "redis": {"url": REDIS, "prefix": prefix, "lines": ["b"], "block_ms": 50, "control_stream": None},
        "batcher": {"max_batch_size": batch, "max_delay_ms": 5, "queue_size": max(64, 4 * batch)},
        "http": {"enabled": False}, "allocator": ALLOCATOR,
        "products": [{"id": "p", "object_name": "object", "shots": 0, "mask": "none"}],
    })


def prepare_payloads(engine: ScoringEngine, detector: Detector, payloads: list[bytes]) -> list[PreparedFrame]:
    """The engine's own decode + pre-processing of encoded frames, inline (a frame that fails is an error here)."""
    out = [engine._prepare_one(Frame("p", "b", "f", 0.0, payload=p), detector) for p in payloads]
    if bad := [p for p in out if not isinstance(p, PreparedFrame)]:
        raise ValueError(f"a bench frame did not prepare: {bad[0]}")
    return out


def score_prepared(detector: Detector, state: ProductState, prepared: list[PreparedFrame]) -> None:
    """One batch through the scoring pipeline, no mask wanted (the bench product's `mask: none`)."""
    run([ScoreItem(detector, state, tiles=p.tiles, layout=p.layout, map_size=(1, 1)) for p in prepared])


def engine_only(daemon: InspectDaemon, payloads: list[bytes], batch: int) -> float:
    """Frames/s of the same work without Redis or asyncio, batch by batch, timed after the first batch as
    `saturated_rate` times the end-to-end run: decode + tile + score in one thread on a CPU engine (whose daemon
    decodes on the engine thread too); score alone on a GPU engine, the frames decoded beforehand (its daemon
    decodes in a pool beside the GPU: serial decode here would understate what the GPU does)."""
    entry = daemon.registry.get("p")

    def prepare(chunk: list[bytes]) -> list[PreparedFrame]:
        return prepare_payloads(daemon.engine, entry.detector, chunk)

    on_gpu = daemon.backbone.device.type == "cuda"
    chunks = [payloads[i:i + batch] for i in range(0, len(payloads), batch)]
    ready = [prepare(chunk) for chunk in chunks] if on_gpu else None
    started, timed = time.perf_counter(), len(payloads)
    for i, chunk in enumerate(chunks):
        prepared = ready[i] if ready is not None else prepare(chunk)
        score_prepared(entry.detector, entry.state, prepared)
        if on_gpu:
            torch.cuda.synchronize(daemon.backbone.device)
        if i == 0 and len(chunks) > 1:
            started, timed = time.perf_counter(), len(payloads) - len(chunk)
    return timed / (time.perf_counter() - started)


async def engine_only_on_its_thread(daemon: InspectDaemon, payloads: list[bytes], batch: int) -> float:
    """`engine_only` on the daemon's engine thread, the event loop idle meanwhile: the same thread, and so the same
    OpenMP team, as its forwards (a second team, the caller's, would slow both: `cpu_threads.release_team`)."""
    return await asyncio.get_running_loop().run_in_executor(daemon.engine._engine, engine_only, daemon, payloads,
                                                            batch)


async def produce(client, key: str, payloads: list[bytes], rate: float | None) -> None:  # noqa: ANN001
    """XADD every payload: at ``rate`` frames/s (open loop), or with ``rate`` None as fast as Redis takes them,
    PRODUCE_CHUNK frames a round trip (a backlog: saturation).

    Open loop: frame i is due at i / ``rate`` s and stamped (``ts``, what latency is measured from) with that time,
    as a camera would, and every frame due when the producer wakes goes in one round trip. It shares the daemon's
    event loop: a frame sent late (the loop busy) still counts its wait, and a round trip slower than the interval
    does not lower the offered rate (one awaited XADD a frame offered ~1 850 of 2 000/s with no daemon running)."""
    if not rate:
        for start in range(0, len(payloads), PRODUCE_CHUNK):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(start + PRODUCE_CHUNK, len(payloads))):
                pipe.xadd(key, frame_fields("p", "b", f"f{i}", payloads[i], captured_at=time.time()))
            await pipe.execute()
        return
    interval, started, wall = 1.0 / rate, time.perf_counter(), time.time()
    sent = 0
    while sent < len(payloads):
        due = min(len(payloads), int((time.perf_counter() - started) / interval) + 1)
        pipe = client.pipeline(transaction=False)
        for i in range(sent, due):
            pipe.xadd(key, frame_fields("p", "b", f"f{i}", payloads[i], captured_at=wall + i * interval))
        await pipe.execute()
        sent = due
        await asyncio.sleep(max(0.0, started + sent * interval - time.perf_counter()))


async def saturated_rate(client, key: str, n: int, batch: int, timeout: float = 600,  # noqa: ANN001
                         opens_ms: int | None = None, opened: list[str] | None = None) -> float:
    """Results/s once ``n`` results are in, from Redis's own entry times (ms). The window opens at the results of
    one batch (at most ``batch``, the batch limit, written within FIRST_BATCH_MS): the first batch, or with
    ``opens_ms`` (Redis's clock when the producer had added every frame) the first batch written after that, so
    the producer's own XADDs, a client's work that a line's cameras do on other machines, are not inside it (unless
    the daemon kept up with the producer: fewer than a quarter of the results, or one batch, came after it). The
    rate is the results after that batch over the time from its results to the last one; ``opened`` gets where the
    window opened ("after the producer" or "at the first batch"). Neither how often this polls nor reading the
    results back is inside the window."""
    await _wait_for(client, key, n, timeout)
    written = [int(eid.split(b"-")[0]) for eid, _ in await client.xrange(key)]
    window, after_producer = written, False
    if opens_ms is not None:
        later = [ms for ms in written if ms >= opens_ms]
        if len(later) * 4 >= len(written) and len(later) > _first_batch(later, batch):
            window, after_producer = later, True
    if opened is not None:
        opened.append("after the producer" if after_producer else "at the first batch")
    first_batch = _first_batch(window, batch)
    if len(window) <= first_batch or window[-1] == window[0]:
        raise ValueError(f"{len(window)} results within {window[-1] - window[0] if window else 0} ms of the window: "
                         f"too few frames for a rate at batch limit {batch}")
    return (len(window) - first_batch) / ((window[-1] - window[0]) / 1000.0)


def _first_batch(written: list[int], batch: int) -> int:
    """How many of ``written`` (entry ms, in order) belong to the batch that opens them."""
    return min(batch, sum(1 for ms in written if ms <= written[0] + FIRST_BATCH_MS)) if written else 0


async def redis_ms(client) -> int:  # noqa: ANN001
    """Redis's own clock in ms (what its entry ids are made of)."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _wait_for(client, key: str, n: int, timeout: float) -> None:  # noqa: ANN001
    """Until ``key`` holds ``n`` entries (TimeoutError after ``timeout`` s). Polled slowly: the times come from the
    entries, and this client shares the daemon's event loop and cores (every 20 ms it was a sixth of the loop's CPU
    at batch 16, py-spy --gil)."""
    deadline = time.monotonic() + timeout
    while (have := await client.xlen(key)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {have} of {n} results after {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def collect(client, key: str, n: int, timeout: float = 600) -> list[float]:  # noqa: ANN001
    """End-to-end latencies: result entry time (ms id) minus the frame's capture time."""
    await _wait_for(client, key, n, timeout)
    entries = await client.xrange(key)
    return [int(eid.split(b"-")[0]) / 1000.0 - float(f[b"ts"]) for eid, f in entries]


async def start_daemon(arch: str, batch: int, backbone, decode_threads: int = -1,  # noqa: ANN001, ANN201
                       precision: str = "auto", device: str = "auto"):
    """(daemon, its task, a Redis client, the key prefix): a daemon reading line "b" under a fresh prefix."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(REDIS)
    daemon = InspectDaemon(config(arch, batch, prefix, decode_threads, precision, device, backbone.spec.resize),
                           backbone=backbone)
    task = asyncio.create_task(daemon.run())
    while not daemon.started:
        await asyncio.sleep(0.05)
    return daemon, task, client, prefix


async def stop_daemon(daemon: InspectDaemon, task: asyncio.Task, client, prefix: str) -> None:  # noqa: ANN001
    """Stop the daemon, delete its keys, close the client."""
    daemon.request_stop()
    await task
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def measure(arch: str, batch: int, n: int, size: int, backbone, decode_threads: int,  # noqa: ANN001
                  precision: str = "auto", device: str = "auto", camera: bool = False) -> dict:
    """engine / e2e / their ratio / latency at one batch limit; ``camera``: 1080p JPEG frames (decoded as
    the backbone's model.resize says) instead of ``size``-px PNGs."""
    cpu_threads.release_team()  # the caller's OpenMP team (a model loaded, other benchmarks): the engine's only
    daemon, task, client, prefix = await start_daemon(arch, batch, backbone, decode_threads, precision, device)
    payloads = camera_frames(n) if camera else frames(n, size)
    frames_key, results_key = f"{prefix}:{{b}}:frames", f"{prefix}:{{b}}:results"
    engine_rates, e2e_rates = [], []
    opened: list[str] = []  # where each e2e window opened (saturated_rate)
    for _ in range(REPEATS):  # alternate the two measurements; medians resist this VM's noisy neighbours
        engine_rates.append(await engine_only_on_its_thread(daemon, payloads, batch))
        await client.delete(results_key)
        await produce(client, frames_key, payloads, None)  # saturation: every frame waiting or being read
        e2e_rates.append(await saturated_rate(client, results_key, n, batch, opens_ms=await redis_ms(client),
                                              opened=opened))
    engine_rate, e2e_rate = float(np.median(engine_rates)), float(np.median(e2e_rates))
    # each pair ran within seconds of each other: this VM's host slows both alike, which a ratio of medians taken
    # over different minutes does not cancel (pairs measured 0.82-1.12 within one minute)
    pairs = np.array(e2e_rates) / np.array(engine_rates)
    ratio = float(np.median(pairs))
    batches = daemon.metrics.batch_size
    total = sum(s.value for m in batches.collect() for s in m.samples if s.name.endswith("_sum"))
    count = sum(s.value for m in batches.collect() for s in m.samples if s.name.endswith("_count"))
    row = {"batch": batch, "engine": engine_rate, "e2e": e2e_rate, "ratio": ratio,
           "ratio_range": [float(pairs.min()), float(pairs.max())], "mean_batch": total / max(count, 1),
           "windows_after_producer": opened.count("after the producer"), "pairs": len(opened)}
    for load in (0.5, 0.9):
        await client.delete(results_key)
        m = min(len(payloads), max(20, n // 2))
        await produce(client, frames_key, payloads[:m], rate=load * e2e_rate)
        latencies = np.array(await collect(client, results_key, m))
        row[f"p50@{load:.0%}"] = float(np.percentile(latencies, 50) * 1000)
        row[f"p99@{load:.0%}"] = float(np.percentile(latencies, 99) * 1000)
    await stop_daemon(daemon, task, client, prefix)
    return row


async def main_async(args: argparse.Namespace) -> None:
    backbone = build_backbone(config(args.arch, 1, "x"))
    print(f"model {args.arch} (random weights), {args.size}px frames, {args.frames} frames per setting")
    print(f"{'batch':>5s} {'engine img/s':>13s} {'e2e img/s':>10s} {'overhead':>9s} {'mean batch':>11s} "
          f"{'p50@50%':>9s} {'p99@50%':>9s} {'p50@90%':>9s} {'p99@90%':>9s}  (latency ms)")
    for batch in args.batches:
        r = await measure(args.arch, batch, args.frames, args.size, backbone, args.decode_threads)
        overhead = 1 - r["ratio"]
        print(f"{batch:5d} {r['engine']:13.1f} {r['e2e']:10.1f} {overhead:9.1%} {r['mean_batch']:11.2f} "
              f"{r['p50@50%']:9.1f} {r['p99@50%']:9.1f} {r['p50@90%']:9.1f} {r['p99@90%']:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="inspectd-tiny")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--decode-threads", type=int, default=-1, help="-1 = the daemon's auto choice")
    parser.add_argument("--allocator", choices=allocator.CHOICES, default="keep")
    args = parser.parse_args()
    global ALLOCATOR
    ALLOCATOR = args.allocator
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
