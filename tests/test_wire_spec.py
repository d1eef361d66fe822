"""The stream spec (spec/streams.asyncapi.yaml) is the contract: it is a well-formed AsyncAPI 3.0 document of
JSON Schemas, README's tables are generated from it, its reasons are the one Reason enum, and the daemon's real
results and dead letters (every reason cheap to provoke) validate against it.

Also the helpers other wire tests use: ``wire_errors(kind, fields)`` validates one stream entry (bytes or text
values) against the spec's payload schema ``kind`` and the JSON inside its JSON fields.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import re
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from jsonschema import Draft7Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from inspectd.daemon.app import InspectDaemon
from inspectd.streams.message import frame_fields
from inspectd.streams.reasons import REASONS, Reason
from inspectd.streams.redis_keys import StreamKeys
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = REPO / "spec" / "streams.asyncapi.yaml"
SPEC_URI = "urn:inspectd:streams"
STAGES = ("parse", "decode", "product", "score", "publish")


# ----------------------------------------------------------------------------- helpers (also for other wire tests)
@cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def schema(kind: str) -> dict[str, Any]:
    """The payload schema ``kind`` (components/schemas/<kind>)."""
    return spec()["components"]["schemas"][kind]


@cache
def _validator(kind: str) -> Draft7Validator:
    registry = Registry().with_resource(SPEC_URI, Resource(contents=spec(), specification=DRAFT7))
    return Draft7Validator({"$ref": f"{SPEC_URI}#/components/schemas/{kind}"}, registry=registry)


def readme_tables_module() -> Any:
    loaded = importlib.util.spec_from_file_location("readme_tables", REPO / "spec" / "readme_tables.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def wire_errors(kind: str, fields: dict[Any, Any]) -> list[str]:
    """Why a stream entry does not match the spec's payload ``kind`` ([] when it does). Text fields must be UTF-8;
    binary ones (``contentEncoding: binary``) are taken as byte strings; JSON fields are parsed and checked against
    their ``contentSchema``."""
    props = schema(kind)["properties"]
    errors: list[str] = []
    instance: dict[str, str] = {}
    for key, value in fields.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        prop = props.get(name, {})
        if isinstance(value, bytes):
            if prop.get("contentEncoding") == "binary":
                instance[name] = value.decode("latin-1")
                continue
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                errors.append(f"{name}: not UTF-8")
                continue
        instance[name] = value
        if prop.get("contentMediaType") == "application/json":
            try:
                content = json.loads(value)
            except ValueError as exc:
                errors.append(f"{name}: not JSON ({exc})")
                continue
            inner = Draft7Validator(prop.get("contentSchema", {}))
            errors += [f"{name}: {e.message}" for e in inner.iter_errors(content)]
    errors += [f"{'.'.join(map(str, e.path)) or '<entry>'}: {e.message}"
               for e in _validator(kind).iter_errors(instance)]
    undocumented = sorted(set(instance) - set(props))
    if undocumented:
        errors.append(f"fields not in the spec: {undocumented}")
    return errors


def text(fields: dict[bytes, bytes]) -> dict[str, str]:
    """An entry's fields as text (the mask as its length)."""
    return {k.decode(): (v.decode("utf-8") if k != b"mask" else str(len(v))) for k, v in fields.items()}


# ----------------------------------------------------------------------------- the document
def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(pointer: str) -> Any:
    node: Any = spec()
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_spec_is_an_asyncapi_3_document_of_json_schemas() -> None:
    doc = spec()
    assert doc["asyncapi"].startswith("3.0")
    assert set(doc["channels"]) == {"frames", "results", "dead", "control"}
    for ref in _refs(doc):
        assert ref.startswith("#/"), ref
        _resolve(ref)  # every local reference resolves
    for name, channel in doc["channels"].items():
        for parameter in re.findall(r"{([^}]+)}", channel["address"]):
            assert parameter in channel["parameters"], (name, parameter)
    for operation in doc["operations"].values():
        assert operation["action"] in ("send", "receive")
    for name, payload in doc["components"]["schemas"].items():
        Draft7Validator.check_schema(payload)
        for field, prop in payload["properties"].items():
            assert prop["type"] == "string", (name, field)  # every value is a Redis bulk string
            assert prop.get("description") and prop.get("x-format"), (name, field)
            if "contentSchema" in prop:
                Draft7Validator.check_schema(prop["contentSchema"])
        assert set(payload.get("required", ())) <= set(payload["properties"]), name


def test_the_spec_reasons_are_the_one_reason_enum_with_their_stages() -> None:
    dead = schema("DeadLetterFields")
    assert dead["properties"]["reason"]["enum"] == [r.value for r in Reason]
    assert dead["properties"]["stage"]["enum"] == list(STAGES)
    stage_of: dict[str, str] = {}
    for rule in dead["allOf"]:
        stage = rule["then"]["properties"]["stage"]["const"]
        for reason in rule["if"]["properties"]["reason"]["enum"]:
            assert reason not in stage_of, f"{reason} has two stages"
            stage_of[reason] = stage
    assert stage_of == {r.value: REASONS[r][0] for r in Reason}
    assert {stage for stage, _ in REASONS.values()} <= set(STAGES)
    # the rules bite: a reason with another stage is invalid
    letter = {"reason": "bad_ts", "stage": "decode", "product": "p", "line": "l1", "frame_id": "f", "entry_id": "1-0",
              "source": "s", "detail": "", "fields": "{}"}
    assert any("stage" in e for e in wire_errors("DeadLetterFields", letter))
    assert wire_errors("DeadLetterFields", {**letter, "stage": "parse"}) == []


def _readme_rows(readme: str, name: str) -> list[list[str]]:
    block = re.search(rf"<!-- spec:{name} -->\n(.*?)<!-- /spec:{name} -->", readme, re.S)
    assert block, f"README has no generated {name} table"
    lines = [line for line in block.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_readme_tables_are_the_spec_field_by_field() -> None:
    readme = (REPO / "README.md").read_text()
    tables = readme_tables_module()
    assert tables.stale_tables(readme, spec()) == [], "README tables are stale: run python3 spec/readme_tables.py"
    for name, kind in tables.FIELD_TABLES.items():
        payload = schema(kind)
        rows = _readme_rows(readme, name)
        assert [r[0] for r in rows] == [f"`{f}`" for f in payload["properties"]], name
        for (_cell, required, fmt, meaning), (prop_name, prop) in zip(rows, payload["properties"].items(), strict=True):
            need = prop.get("x-required") or ("yes" if prop_name in payload.get("required", ()) else "no")
            assert required == need, (name, prop_name)
            assert (required == "yes") == (prop_name in payload.get("required", ())), (name, prop_name)
            assert fmt == " ".join(prop["x-format"].split()), (name, prop_name)
            assert meaning == " ".join(prop["description"].split()), (name, prop_name)
    reason_rows = _readme_rows(readme, "reasons")
    assert [(r[0].strip("`"), r[1]) for r in reason_rows] == [(r.value, REASONS[r][0]) for r in Reason]


# ----------------------------------------------------------------------------- the daemon's messages
def wire_config(redis_url: str, prefix: str, tmp: Path, **over: Any):  # noqa: ANN201
    """One line l1; zero-shot products with a mask in full (`wire`) and downscaled to 32 (`wire-small`), and one
    whose build fails (`broken`)."""
    products = [{"id": "wire", "object_name": "hazelnut", "shots": 0, "mask": "full"},
                {"id": "wire-small", "object_name": "hazelnut", "shots": 0, "mask": "downscaled:32"},
                {"id": "broken", "object_name": "hazelnut", "shots": 2, "references": str(tmp / "no-such-dir")}]
    redis = {"url": redis_url, "prefix": prefix, "lines": ["l1"], "block_ms": 50, "control_stream": None,
             **over.pop("redis", {})}
    return daemon_config(redis_url, prefix, tmp, registry={"watch": False}, redis=redis, products=products, **over)


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


async def wait_for_entries(client: Any, keys: list[str], n: int, timeout: float = 30) -> list[tuple[str, dict]]:
    deadline = time.monotonic() + timeout
    while True:
        entries = [(key, dict(fields)) for key in keys for _, fields in await client.xrange(key)]
        if len(entries) >= n or time.monotonic() > deadline:
            return entries
        await asyncio.sleep(0.05)


META = '{ "lot" : "Ä-17",\n\t"note": "naïve ✓ 東京" ,"n": 1.50 }'.encode()
TS = "1717171717.25"


async def test_daemon_results_and_dead_letters_validate_against_the_spec(
        redis_client, redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    config = wire_config(redis_url, key_prefix, tmp_path, redis={"max_deliveries": 1, "claim_idle_ms": 1000},
                         decode={"max_bytes": 300_000, "max_pixels": 1_000_000, "max_meta_bytes": 1024})
    keys = StreamKeys(key_prefix)
    frames = keys.frames("l1")
    group = config.redis.group
    # two entries another consumer took and never acked: the daemon claims them once idle
    await redis_client.xgroup_create(frames, group, id="0", mkstream=True)
    await redis_client.xadd(frames, frame_fields("wire", "l1", "ghosted", b"x", meta={"k": 1}))
    deleted = await redis_client.xadd(frames, frame_fields("wire", "l1", "deleted", b"x"))
    await redis_client.xreadgroup(group, "ghost", {frames: ">"}, count=2)
    await redis_client.xdel(frames, deleted)
    await redis_client.xreadgroup(group, "ghost", {frames: "0"}, count=2)  # delivered twice: > max_deliveries 1
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        rgb = np.asarray(Image.open(io.BytesIO(png_bytes(HAZELNUT / "colour" / "03.png", 96))))
        good = encoded(rgb)
        noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
        expected = {  # frame id -> reason (None: a result)
            "png": None, "small": None, "raw8": None, "raw16": None,
            "missing": Reason.MISSING_FIELD, "foreign": Reason.BAD_LINE, "shape": Reason.BAD_SHAPE,
            "dtype": Reason.BAD_DTYPE, "order": Reason.BAD_BYTE_ORDER, "ts": Reason.BAD_TS, "nan-ts": Reason.BAD_TS,
            "meta-list": Reason.BAD_META, "meta-latin1": Reason.BAD_META, "fat-meta": Reason.META_TOO_LARGE,
            "big": Reason.TOO_LARGE, "pixels": Reason.TOO_MANY_PIXELS, "strip": Reason.TOO_MANY_TILES,
            "corrupt": Reason.CORRUPT_IMAGE, "gif": Reason.UNSUPPORTED_FORMAT, "raw-short": Reason.BAD_RAW_SHAPE,
            "unknown": Reason.UNKNOWN_PRODUCT, "broken": Reason.PRODUCT_FAILED,
            "ghosted": Reason.TOO_MANY_DELIVERIES, deleted.decode(): Reason.DELETED_BEFORE_SCORING,
        }

        def frame(frame_id: str, image: bytes = good, product: str = "wire", **kw: Any) -> dict:
            return frame_fields(product, "l1", frame_id, image, captured_at=float(TS), meta=META, **kw)

        raw16 = (rgb.astype(np.uint16) * 257).astype(">u2").tobytes()
        entries = [
            frame("png"), frame("small", product="wire-small"),
            frame("raw8", rgb.tobytes(), shape=rgb.shape, dtype="uint8"),
            frame("raw16", raw16, shape=rgb.shape, dtype="uint16", byte_order="big"),
            {k: v for k, v in frame("missing").items() if k != "image"},
            {**frame("foreign"), "line": "l2"},
            frame("shape", rgb.tobytes(), shape=(96, 96, 3), dtype="uint8") | {"shape": "96,96,2"},
            frame("dtype", rgb.tobytes(), shape=rgb.shape, dtype="float32"),
            frame("order", raw16, shape=rgb.shape, dtype="uint16", byte_order="middle"),
            frame("ts") | {"ts": "yesterday"}, frame("nan-ts") | {"ts": "nan"},
            frame("meta-list") | {"meta": "[1, 2]"}, frame("meta-latin1") | {"meta": '{"a": "\xe9"}'.encode("latin-1")},
            frame("fat-meta") | {"meta": json.dumps({"x": "y" * 2000})},
            frame("big", encoded(noise)), frame("pixels", encoded(np.zeros((1000, 1200, 3), np.uint8))),
            frame("strip", encoded(np.full((10, 10000, 3), 128, np.uint8))),
            frame("corrupt", b"\x89PNG\r\n\x1a\nnot really"), frame("gif", encoded(rgb, "GIF")),
            frame("raw-short", rgb.tobytes()[:-1], shape=rgb.shape, dtype="uint8"),
            frame("unknown", product="no-such-product"), frame("broken", product="broken"),
        ]
        for fields in entries:
            await redis_client.xadd(frames, fields)
        n_results = sum(1 for reason in expected.values() if reason is None)
        results = await wait_for_entries(redis_client, [keys.results("l1")], n_results)
        dead = await wait_for_entries(redis_client, [keys.dead("l1")], len(expected) - n_results)
        # a detector that raises: the batch's frames become detector_error dead letters
        original = daemon.engine.score

        async def failing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("detector exploded")

        daemon.engine.score = failing
        await redis_client.xadd(frames, frame("exploded"))
        expected["exploded"] = Reason.DETECTOR_ERROR
        dead = await wait_for_entries(redis_client, [keys.dead("l1")], len(expected) - n_results)
        daemon.engine.score = original
    finally:
        await daemon.shutdown()

    got_results = {text(f)["frame_id"]: f for _, f in results}
    got_dead = {text(f)["frame_id"]: text(f) for _, f in dead}
    assert sorted(got_results) == sorted(k for k, v in expected.items() if v is None)
    assert {k: d["reason"] for k, d in got_dead.items()} == {k: v.value for k, v in expected.items() if v is not None}
    for frame_id, fields in got_results.items():
        assert wire_errors("ResultFields", fields) == [], frame_id
    for frame_id, fields in got_dead.items():
        assert wire_errors("DeadLetterFields", fields) == [], frame_id
        assert fields["stage"] == REASONS[Reason(fields["reason"])][0]
    # every dead letter keeps the original small fields, whatever its stage (the entry that is gone excepted)
    for frame_id, letter in got_dead.items():
        original = json.loads(letter["fields"])
        if letter["reason"] == Reason.DELETED_BEFORE_SCORING:
            assert original == {}
            continue
        assert original["frame_id"] == frame_id and "image" not in original, frame_id
        if frame_id not in ("ghosted", "missing"):
            assert original["image_bytes"].isdigit(), frame_id
        if frame_id not in ("ghosted", "ts", "nan-ts", "meta-list", "meta-latin1", "fat-meta"):
            assert original["ts"] == repr(float(TS)) and original["meta"] == META.decode(), frame_id
    assert json.loads(got_dead["ghosted"]["fields"])["meta"] == '{"k":1}'
    from inspectd.streams.codec import decode_mask_png

    full, bits = decode_mask_png(got_results["png"][b"mask"])
    assert full.shape == rgb.shape[:2] and bits == 8  # mask: full
    assert decode_mask_png(got_results["small"][b"mask"])[0].shape == (32, 32)  # downscaled:32


async def test_an_unpublishable_result_validates_and_keeps_the_frame_fields(redis_client, key_prefix) -> None:
    from inspectd.daemon.metrics import Metrics
    from inspectd.daemon.publisher import Publisher
    from inspectd.streams.redis_sink import RedisResultSink
    from inspectd.streams.schema import Result

    keys = StreamKeys(key_prefix)
    fields = {"product": "p", "frame_id": "b", "ts": "12.5", "meta": '{"lot": 3}', "image_bytes": "10"}
    bad = Result(product="p", line="no such {line}", frame_id="b", captured_at=12.5, score=0.1, verdict="OK",
                 threshold=0.5, detector="winclip", state_version="1", source=f"redis:{keys.frames('l1')}",
                 entry_id="5-0", input_fields=fields)
    _, dead = await asyncio.wait_for(Publisher([RedisResultSink(redis_client, keys)], Metrics()).publish([bad], []), 10)
    assert [d.reason for d in dead] == [Reason.UNPUBLISHABLE]
    [(_, letter)] = [(i, f) for i, f in await redis_client.xrange(keys.dead("l1"))]
    assert wire_errors("DeadLetterFields", letter) == []
    assert json.loads(letter[b"fields"]) == fields


@pytest.mark.parametrize("kind", ["ResultFields", "DeadLetterFields", "FrameFields", "ControlFields"])
def test_what_the_spec_refuses(kind: str) -> None:
    """The schemas are not vacuous: an entry missing a required field, or with a bad enum value, is refused."""
    payload = schema(kind)
    required = payload["required"]
    assert any("required" in e for e in wire_errors(kind, {}))
    enum_field = next(name for name, prop in payload["properties"].items() if "enum" in prop)
    entry = {name: "x" for name in required} | {enum_field: "not-a-value"}
    assert any(enum_field in e for e in wire_errors(kind, entry))
