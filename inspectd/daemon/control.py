"""Fleet control stream: every daemon XREADs ``redis.control_stream`` (no consumer group, so every instance
sees every command) and applies ``{"op": reload|put|delete, "product": id, "config": json}`` to its registry.

The reader never waits for a build: each command is handed to the registry as a job of its own, and the next entry
is read as soon as the registry has taken the command in (it stopped the build the command supersedes and queued
behind the product's lock), so builds of different products run side by side (up to ``registry.build_workers``)
while commands of one product keep the stream's order under the registry's rules: a newer reload/put stops the
build still running (that command counts as ``superseded``, not as an error), a delete stops it and removes.
A job's failure is logged and counted (``errors``, the ``control`` error metric) when its build ends.

Delivery: there is no group and nothing to acknowledge; the position is kept in memory and moves past an entry once
the registry has taken it in. A daemon starts after the newest entry (products come from its config and product
files), so commands sent while it was down, or still building when it stopped, are not replayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from inspectd.daemon.config import ConfigError, ProductConfig, build, resolve_product_paths
from inspectd.daemon.registry import BuildError, BuildSuperseded, ProductRegistry
from inspectd.streams.retry import Backoff

log = logging.getLogger(__name__)

OPS = ("reload", "put", "delete")
BLOCK_MS = 1000
READ_COUNT = 100


class CommandError(ValueError):
    """A control message that cannot be applied as written."""


def command_fields(op: str, product: str, config: dict[str, Any] | None = None) -> dict[str, str]:
    """The stream entry for one command (what ``inspectd product`` XADDs)."""
    if op not in OPS:
        raise CommandError(f"unknown op {op!r}, expected one of {list(OPS)}")
    fields = {"op": op, "product": product}
    if config is not None:
        fields["config"] = json.dumps(config)
    return fields


def parse_command(fields: dict[bytes | str, bytes | str], products_dir: str | None = None
                  ) -> tuple[str, str, ProductConfig | None]:
    """(op, product, config of a put); a put's relative paths are taken relative to ``products_dir``, as the admin
    API takes them (where a persisted product is saved, so its file reads the same)."""
    text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}
    op, product = text.get("op", ""), text.get("product", "")
    if op not in OPS:
        raise CommandError(f"unknown op {op!r}, expected one of {list(OPS)}")
    if not product:
        raise CommandError("missing field 'product'")
    if op != "put":
        return op, product, None
    try:
        data = json.loads(text.get("config", ""))
    except json.JSONDecodeError as exc:
        raise CommandError(f"put {product}: field 'config' is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CommandError(f"put {product}: 'config' must be a JSON object")
    data.setdefault("id", product)
    if data["id"] != product:
        raise CommandError(f"put {product}: config id {data['id']!r} does not match the command's product")
    try:
        config = build(ProductConfig, data, "")
    except ConfigError as exc:
        raise CommandError(f"put {product}: {exc}") from exc
    if products_dir:
        resolve_product_paths(config, Path(products_dir))
    return op, product, config


class ControlListener:
    """Reads the control stream from the entry that was last when it started; hands each command to the registry in
    order, without waiting for its build (see the module notes)."""

    def __init__(self, redis: Any, stream: str, registry: ProductRegistry, metrics: Any = None,
                 persist: bool = False, block_ms: int = BLOCK_MS) -> None:
        self.redis = redis
        self.stream = stream
        self.registry = registry
        self.metrics = metrics
        self.persist = persist  # write put/delete into products_dir too
        self.block_ms = block_ms
        self.applied = 0
        self.errors = 0
        self.superseded = 0  # commands whose build a newer command of the same product stopped
        self.last_id = "0-0"
        self._task: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()  # commands being applied (their builds running or queued)
        self._file_locks: dict[str, asyncio.Lock] = {}  # product -> persistence in the order the builds ended

    async def start(self) -> None:
        # "$" resolved once, here: re-sending "$" on every XREAD would skip commands added between reads
        last = await self.redis.xrevrange(self.stream, count=1)
        self.last_id = last[0][0].decode() if last else "0-0"
        self._task = asyncio.create_task(self._run(), name="control")
        log.info("control stream %s: listening after %s", self.stream, self.last_id)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Cancel the listener and the commands still being applied (their builds are not waited for); bounded, so
        a read stuck inside the Redis client never holds up shutdown."""
        tasks = [self._task] if self._task is not None else []
        tasks += list(self._jobs)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
            if stuck:
                log.warning("control stream %s: %d task(s) did not stop within %.1fs; leaving them", self.stream,
                            len(stuck), timeout_s)
        self._task = None

    def pending(self) -> int:
        """Commands handed to the registry whose build (or removal) has not ended yet."""
        return len(self._jobs)

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                reply = await self.redis.xread({self.stream: self.last_id}, count=READ_COUNT, block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: back off, keep the position
                self._error(f"read failed: {exc}")
                await backoff.wait()
                continue
            backoff.reset()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self.submit(fields)
                    self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    async def submit(self, fields: dict) -> asyncio.Task | None:
        """Start applying one command; returns once the registry has taken it in (not when its build ends), with
        the job applying it, or None for a command that cannot be applied as written (logged and counted)."""
        try:
            op, product, config = parse_command(fields, self.registry.config.products_dir)
        except CommandError as exc:
            self._error(str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - a malformed entry must never stop the listener
            self._error(f"unreadable command {fields!r}: {type(exc).__name__}: {exc}", exc_info=True)
            return None
        job = asyncio.create_task(self._apply(op, product, config), name=f"control:{op}:{product}")
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        # One step of the job runs now: up to its first wait the registry stops the build it supersedes and queues
        # it behind the product's lock (what admin's ?wait=false relies on too), so the next command of the same
        # product comes after it, as in the stream.
        await asyncio.sleep(0)
        return job

    async def _apply(self, op: str, product: str, config: ProductConfig | None) -> bool:
        try:
            if op == "reload":
                entry = await self.registry.reload(product)
                log.info("control: reload %s -> version %d", product, entry.version)
            elif op == "put":
                assert config is not None  # parse_command gives every put a config
                entry = await self.registry.put(config)
                if self.persist:
                    async with self._file_lock(product):  # one product's file writes in the order its builds end
                        await asyncio.to_thread(self.registry.save_product_file, config)
                log.info("control: put %s -> version %d", product, entry.version)
            else:
                if not await self.registry.remove(product):
                    raise CommandError(f"delete {product}: unknown product")
                if self.persist:
                    async with self._file_lock(product):
                        await asyncio.to_thread(self.registry.delete_product_file, product)
                log.info("control: deleted %s", product)
        except KeyError as exc:
            self._error(f"reload {exc.args[0]}: product is not serving")
            return False
        except BuildSuperseded as exc:
            self.superseded += 1
            log.info("control stream %s: %s %s: %s", self.stream, op, product, exc)
            return False
        except (CommandError, BuildError) as exc:
            self._error(str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. the product file cannot be written: counted, not lost
            self._error(f"{op} {product}: {type(exc).__name__}: {exc}", exc_info=True)
            return False
        self.applied += 1
        return True

    def _file_lock(self, product: str) -> asyncio.Lock:
        return self._file_locks.setdefault(product, asyncio.Lock())

    def _error(self, message: str, exc_info: bool = False) -> None:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.error("control")
        log.error("control stream %s: %s", self.stream, message, exc_info=exc_info)
