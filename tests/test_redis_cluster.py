"""Redis Cluster (``redis.cluster: true``) against a real local cluster: three ``redis-server --cluster-enabled``
nodes on loopback ports (started here, joined with ``redis-cli --cluster create``, AOF with fsync always).
Lines whose hash tags live on different nodes are scored exactly once each, and a node killed and restarted
mid-stream loses nothing (the daemon keeps running; a redelivered frame may be scored twice, same frame_id)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.streams.message import frame_fields
from inspectd.streams.redis_keys import StreamKeys
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, read_stream

pytestmark = pytest.mark.redis
LINES = ["l1", "l3", "l4"]  # hash slots 10293, 2167, 14480: one per node of an evenly split 3-node cluster


def _port_pair_free(port: int) -> bool:
    """``port`` and its cluster bus port (``port + 10000``) can both be bound on loopback."""
    for candidate in (port, port + 10000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def _free_cluster_ports(n: int) -> list[int]:
    ports: list[int] = []
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    while len(ports) < n:
        port = rng.randrange(20000, 40000)
        if port not in ports and _port_pair_free(port):
            ports.append(port)
    return ports


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout


@dataclass
class LocalCluster:
    """Three primaries (no replicas) on loopback; ``restart`` kills one and starts it again on its files."""

    root: Path
    ports: list[int]
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"  # any one node: the client discovers the others

    def start_node(self, port: int) -> None:
        workdir = self.root / str(port)
        workdir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--dir", str(workdir),
             "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ping(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while _cli(port, "ping").strip() != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {port} did not start; see {self.root / str(port)}/redis.log")
            time.sleep(0.05)

    def state_ok(self) -> bool:
        return all("cluster_state:ok" in _cli(port, "cluster", "info") for port in self.ports)

    def wait_ok(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.state_ok():
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)  # harder than SIGTERM: nothing is flushed on the way out
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        reason = f"Redis Cluster tests skipped: {' and '.join(missing)} not on PATH (needed to start a local cluster)"
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None:  # printed even without -rs: a skipped cluster test must not go unnoticed
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                reporter.write_line(f"\n{reason}")
        pytest.skip(reason)
    local = LocalCluster(tmp_path_factory.mktemp("redis-cluster"), _free_cluster_ports(3))
    try:
        for port in local.ports:
            local.start_node(port)
        for port in local.ports:
            local.wait_ping(port)
        created = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in local.ports),
                                  "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True,
                                 timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        local.wait_ok()
        yield local
    finally:
        local.stop()


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[object]:
    from redis.asyncio.cluster import RedisCluster

    redis = RedisCluster.from_url(cluster.url)
    await redis.initialize()  # the slot map, for node lookups before the first command
    yield redis
    await redis.aclose()


def cluster_config(cluster: LocalCluster, prefix: str, tmp: Path, **redis_over):  # noqa: ANN003, ANN201
    config = daemon_config(cluster.url, prefix, tmp, registry={"watch": False},
                           redis={"url": cluster.url, "cluster": True, "prefix": prefix, "lines": LINES,
                                  "block_ms": 100, "claim_idle_ms": 2000, "control_stream": None, **redis_over})
    config.products = [p for p in config.products if p.id == "grid"]  # zero-shot: quick to build
    return config


async def results_by_line(client, keys: StreamKeys, kind: str = "results") -> dict[str, Counter]:  # noqa: ANN001
    return {line: Counter(r["frame_id"] for r in await read_stream(client, getattr(keys, kind)(line)))
            for line in LINES}


async def until(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # e.g. a node that is restarting
            if await predicate():
                return True
        await asyncio.sleep(0.1)
    return False


def node_of(client, key: str) -> str:  # noqa: ANN001
    return client.get_node_from_key(key).name


async def test_lines_on_different_nodes_are_each_scored_exactly_once(cluster, client, key_prefix, tmp_path,
                                                                     tiny_backbone) -> None:
    keys = StreamKeys(key_prefix)
    nodes = {line: node_of(client, keys.frames(line)) for line in LINES}
    assert len(set(nodes.values())) >= 2, nodes  # the lines really are sharded
    for line in LINES:  # a line's three streams share its slot, hence its node
        assert len({await client.cluster_keyslot(getattr(keys, kind)(line)) for kind in ("frames", "results",
                                                                                           "dead")}) == 1
    config = cluster_config(cluster, key_prefix, tmp_path, keep_acked_s=0, idle_consumer_s=0.001)
    group = config.redis.group
    image = png_bytes(HAZELNUT / "good" / "05.png")
    sent: dict[str, list[str]] = {line: [f"crashed-{line}"] for line in LINES}
    for line in LINES:  # a frame an instance that crashed had read and never acked: XAUTOCLAIM takes it over
        await client.xgroup_create(keys.frames(line), group, id="0", mkstream=True)
        await client.xadd(keys.frames(line), frame_fields("grid", line, f"crashed-{line}", image))
        assert len((await client.xreadgroup(group, "gone-instance", {keys.frames(line): ">"}))[0][1]) == 1
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        assert [s.streams for s in daemon.sources] == [[keys.frames(line)] for line in LINES]  # a reader per slot
        pipe = client.pipeline(transaction=False)  # one pipeline, split per node by the client
        for i in range(60):
            line = LINES[i % len(LINES)]
            sent[line].append(f"f{i:03d}")
            pipe.xadd(keys.frames(line), frame_fields("grid", line, f"f{i:03d}", image))
        await pipe.execute()

        async def all_scored() -> bool:
            return sum(sum(c.values()) for c in (await results_by_line(client, keys)).values()) >= 63
        assert await until(all_scored, 40)
        got = await results_by_line(client, keys)
        for line in LINES:
            assert got[line] == Counter(sent[line]), line  # each frame once, on its own line's results stream
        assert all(not c for c in (await results_by_line(client, keys, "dead")).values())

        async def all_acked() -> bool:
            return [await s.pending_count() for s in daemon.sources] == [0] * len(daemon.sources)
        assert await until(all_acked, 10)
        assert [s.claimed_total for s in daemon.sources] == [1, 1, 1]
        await daemon.maintain()  # XINFO GROUPS / XPENDING / XTRIM and XINFO CONSUMERS / DELCONSUMER, per node
        assert [await client.xlen(keys.frames(line)) for line in LINES] == [0, 0, 0]  # acked input trimmed
        for line in LINES:
            names = [c["name"].decode() for c in await client.xinfo_consumers(keys.frames(line), group)]
            assert names == [daemon.sources[0].consumer], (line, names)  # "gone-instance" removed
        assert daemon.healthy()
    finally:
        await daemon.shutdown()


@pytest.mark.parametrize("victim", ["other-node", "url-node"])
async def test_a_node_killed_and_restarted_mid_stream_loses_nothing(cluster, client, key_prefix, tmp_path,
                                                                    tiny_backbone, victim) -> None:
    """SIGKILL the node that holds a line (another node, or the one the URL names) while frames keep coming on
    every line, restart it on its AOF and nodes file: every frame sent is scored, nothing is dead-lettered, the
    daemon stays alive. (The other lines are not guaranteed to progress while the node is down: a batch holding
    a result of the dead node's line is retried as a whole and holds up the publish loop — see README.)
    Duplicates (same frame_id) are allowed, at-least-once: a frame in flight whose XACK failed while its node
    was down is redelivered and scored again, and a batch whose results pipeline failed on the dead node is
    published again as a whole, so lines on healthy nodes may get their results of that batch twice (and a
    producer whose XADD reply was lost when the node died resends that frame)."""
    keys = StreamKeys(key_prefix)
    url_node = f"127.0.0.1:{cluster.ports[0]}"
    victim_line = next(line for line in LINES
                       if (node_of(client, keys.frames(line)) == url_node) == (victim == "url-node"))
    port = int(node_of(client, keys.frames(victim_line)).rsplit(":", 1)[1])
    daemon = InspectDaemon(cluster_config(cluster, key_prefix, tmp_path), backbone=tiny_backbone)
    await daemon.start()
    image = png_bytes(HAZELNUT / "good" / "05.png")
    sent: list[tuple[str, str]] = []
    stop = asyncio.Event()

    async def produce(line: str) -> None:  # one producer per line, retrying until Redis confirmed each XADD
        i = 0
        while not stop.is_set():
            frame_id = f"{line}-{i:04d}"
            try:
                await client.xadd(keys.frames(line), frame_fields("grid", line, frame_id, image))
            except Exception:  # noqa: BLE001 - its node is down: retry the same frame
                await asyncio.sleep(0.1)
                continue
            sent.append((line, frame_id))
            i += 1
            await asyncio.sleep(0.06)

    producers = [asyncio.create_task(produce(line)) for line in LINES]
    try:
        await asyncio.sleep(2.0)
        before = len(sent)
        others = [line for line in LINES if line != victim_line]
        scored_before = sum([await client.xlen(keys.results(line)) for line in others])
        cluster.kill(port)
        await asyncio.sleep(2.0)  # the other lines' nodes are up: their frames keep being sent meanwhile
        scored_during = sum([await client.xlen(keys.results(line)) for line in others]) - scored_before
        cluster.start_node(port)  # same dir and nodes-<port>.conf: it reloads its AOF and rejoins
        await asyncio.to_thread(cluster.wait_ok)
        victim_sent = sum(ln == victim_line for ln, _ in sent)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*producers)
        assert before > 0 and sum(ln == victim_line for ln, _ in sent) > victim_sent  # its line resumed
        sent_ids = {line: Counter(f for ln, f in sent if ln == line) for line in LINES}

        async def all_scored() -> bool:
            got = await results_by_line(client, keys)
            return all(set(got[line]) >= set(sent_ids[line]) for line in LINES)
        assert await until(all_scored, 30)

        async def all_acked() -> bool:
            return [await s.pending_count() for s in daemon.sources] == [0] * len(daemon.sources)
        assert await until(all_acked, 15)
        got = await results_by_line(client, keys)
        for line in LINES:
            assert set(got[line]) == set(sent_ids[line]), line  # nothing lost, nothing foreign
        duplicates = sum(n - 1 for c in got.values() for n in c.values())
        print(f"node {port} ({victim}, line {victim_line}) restarted: {len(sent)} frames sent, "
              f"{duplicates} duplicate(s), {scored_during} result(s) of the other lines while it was down")
        assert all(not c for c in (await results_by_line(client, keys, "dead")).values())
        assert daemon.healthy()
    finally:
        stop.set()
        await asyncio.gather(*producers, return_exceptions=True)
        if port not in cluster.procs:  # a failure while it was down: leave a whole cluster to the next test
            cluster.start_node(port)
            await asyncio.to_thread(cluster.wait_ok)
        await daemon.shutdown()


def test_lines_are_grouped_by_hash_slot_and_a_closed_connection_mid_pipeline_is_transient() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from inspectd.daemon.app import _by_slot
    from inspectd.daemon.publisher import is_transient
    from inspectd.streams.redis_sink import _execute

    keys = StreamKeys("p")
    streams = [keys.frames(line) for line in ("ati", "l1", "a0a", "l3")]  # "ati" and "a0a" share slot 5449
    assert list(_by_slot(streams).values()) == [[keys.frames("ati"), keys.frames("a0a")], [keys.frames("l1")],
                                                 [keys.frames("l3")]]

    class Pipe:  # what redis-py's cluster pipeline raises when another task closed its connection mid-write
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        async def execute(self, raise_on_error: bool = True) -> list:
            raise self.exc

    with pytest.raises(RedisConnectionError) as caught:
        asyncio.run(_execute(Pipe(AttributeError("'NoneType' object has no attribute 'writelines'"))))
    assert is_transient(caught.value)  # retried by the publisher, not dead-lettered as unpublishable
    with pytest.raises(AttributeError):  # any other AttributeError is a bug and stays one
        asyncio.run(_execute(Pipe(AttributeError("'Result' object has no attribute 'x'"))))
