"""Cross-language round trip: a Node.js producer/consumer written from the spec (tests/node/roundtrip.mjs, node-redis
and pngjs) against a running daemon, 8- and 16-bit masks; and the spec validated by the AsyncAPI reference parser.

Skipped, with the reason printed, only where `node` is absent, or where tests/node/node_modules is missing (then the
reason names the command that installs it; .ci/run runs it whenever npm exists).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.streams.codec import decode_mask_png
from inspectd.streams.redis_keys import StreamKeys
from tests.test_wire_spec import schema, wire_config, wire_errors

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
INSTALL = "npm ci --prefix tests/node"


def _skip_reason() -> str | None:
    if NODE is None:
        return "node is not installed: the Node.js round trip of the stream spec needs Node.js >= 18"
    for package in ("redis", "pngjs", "js-yaml", "@asyncapi/parser"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            return f"tests/node/node_modules lacks {package}: run `{INSTALL}` (from the repository root)"
    return None


SKIP = _skip_reason()
if SKIP:
    print(f"\ntests/test_wire_node.py skipped: {SKIP}")
pytestmark = [pytest.mark.redis, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


async def node(*args: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(NODE or "node", *args, cwd=NODE_DIR, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


async def test_the_spec_is_valid_asyncapi_for_the_reference_parser() -> None:
    code, out = await node("validate_spec.mjs")
    assert code == 0, out
    assert "VALID AsyncAPI 3.0.0" in out


@pytest.mark.parametrize("mask_bits", [8, 16])
async def test_a_node_client_round_trips_every_documented_field(
        redis_client: Any, redis_url: str, key_prefix: str, tmp_path: Path, tiny_backbone: Any, mask_bits: int) -> None:
    config = wire_config(redis_url, key_prefix, tmp_path, sinks={"mask_bits": mask_bits})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    report_path = tmp_path / "report.json"
    try:
        code, out = await node("roundtrip.mjs", "--redis", redis_url, "--prefix", key_prefix, "--line", "l1",
                               "--product", "wire", "--out", str(report_path), "--timeout", "30")
    finally:
        await daemon.shutdown()
    assert code == 0, out  # the Node side found no problem (its checks print as PROBLEM lines)
    report = json.loads(report_path.read_text())
    assert report["problems"] == []
    keys = StreamKeys(key_prefix)
    redis_view = {fields[b"frame_id"].decode(): fields for _, fields in await redis_client.xrange(keys.results("l1"))}
    props = schema("ResultFields")["properties"]
    assert len(report["results"]) == 4 and len(report["dead"]) == 3
    scores = {}
    for item in report["results"]:
        fields = redis_view[item["fields"]["frame_id"]]
        assert wire_errors("ResultFields", fields) == []
        assert set(item["fields"]) == {k.decode() for k in fields}  # Node saw every field the daemon wrote
        assert set(props) - {"mask"} <= set(item["fields"])  # every documented field (the mask: below)
        for name, value in fields.items():
            seen = item["fields"][name.decode()]
            if name == b"mask":
                import base64

                assert base64.b64decode(seen) == value  # the PNG bytes arrived intact
            else:
                assert seen == value.decode("utf-8"), name  # byte-identical text
        sent = report["sent"][item["frame"]]
        assert item["fields"]["entry_id"] == sent["entry_id"]
        assert item["fields"]["meta"] == sent["fields"].get("meta", "{}")
        assert item["fields"]["mask_bits"] == str(mask_bits)
        # the mask Node decoded is the mask Python decodes, pixel for pixel, at the documented size and depth
        mask = item["mask"]
        array, bits = decode_mask_png(fields[b"mask"])
        assert (mask["depth"], bits, mask["colorType"]) == (mask_bits, mask_bits, 0)
        assert (mask["height"], mask["width"]) == array.shape == (48, 64)  # mask: full = the frame's size
        full_scale = 2 ** mask_bits - 1
        np.testing.assert_array_equal(np.asarray(mask["pixels"]).reshape(array.shape),
                                      np.rint(array * full_scale).astype(np.int64))
        scores[item["frame"].split("-")[0]] = float(item["fields"]["score"])
    assert scores["raw16be"] == scores["raw16le"] == scores["raw8"], scores  # byte_order big read right
    reasons = {d["frame"].split("-")[0]: (d["fields"]["stage"], d["fields"]["reason"]) for d in report["dead"]}
    assert reasons == {"corrupt": ("decode", "corrupt_image"), "unknown": ("product", "unknown_product"),
                       "order": ("parse", "bad_byte_order")}
