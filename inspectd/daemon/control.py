"""Fleet control stream: every daemon XREADs ``redis.control_stream`` (no consumer group, so every instance
sees every command) and applies ``{"op": reload|put|delete, "product": id, "config": json}`` to its registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from inspectd.daemon.config import ConfigError, ProductConfig, build
from inspectd.daemon.registry import BuildError, ProductRegistry
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


def parse_command(fields: dict[bytes | str, bytes | str]) -> tuple[str, str, ProductConfig | None]:
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
        return op, product, build(ProductConfig, data, "")
    except ConfigError as exc:
        raise CommandError(f"put {product}: {exc}") from exc


class ControlListener:
    """Reads the control stream from the entry that was last when it started; applies commands in order."""

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
        self.last_id = "0-0"
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # "$" resolved once, here: re-sending "$" on every XREAD would skip commands added between reads
        last = await self.redis.xrevrange(self.stream, count=1)
        self.last_id = last[0][0].decode() if last else "0-0"
        self._task = asyncio.create_task(self._run(), name="control")
        log.info("control stream %s: listening after %s", self.stream, self.last_id)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Cancel the listener; bounded, so a read stuck inside the Redis client never holds up shutdown."""
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                log.warning("control stream %s: listener did not stop within %.1fs; leaving it", self.stream,
                            timeout_s)
            self._task = None

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
                    self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    await self.apply(fields)

    async def apply(self, fields: dict) -> bool:
        """Apply one command; errors are logged and counted, never raised."""
        try:
            op, product, config = parse_command(fields)
            if op == "reload":
                entry = await self.registry.reload(product)
                log.info("control: reload %s -> version %d", product, entry.version)
            elif op == "put":
                entry = await self.registry.put(config)
                if self.persist:
                    await asyncio.to_thread(self.registry.save_product_file, config)
                log.info("control: put %s -> version %d", product, entry.version)
            else:
                if not await self.registry.remove(product):
                    raise CommandError(f"delete {product}: unknown product")
                if self.persist:
                    await asyncio.to_thread(self.registry.delete_product_file, product)
                log.info("control: deleted %s", product)
        except KeyError as exc:
            self._error(f"reload {exc.args[0]}: product is not serving")
            return False
        except (CommandError, BuildError) as exc:
            self._error(str(exc))
            return False
        self.applied += 1
        return True

    def _error(self, message: str) -> None:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.error("control")
        log.error("control stream %s: %s", self.stream, message)
