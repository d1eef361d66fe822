"""Product files a person edits by hand: one that is not UTF-8, a folder named like one, a key given twice, two
files defining one product. Each is named by `run --check`, and a running daemon skips it and serves the rest."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from inspectd.daemon.app import InspectDaemon
from inspectd.daemon.config import ConfigError, load_config, load_product_file
from inspectd.daemon.products import load_product_dir
from tests.daemon_helpers import daemon_config

pytestmark = pytest.mark.redis


def check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config), "--check"],
                          capture_output=True, text=True, timeout=120)


def test_a_file_that_is_not_utf8_or_gives_a_key_twice_is_a_config_error_naming_it(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"id: latin\nobject_name: \"caf\xe9\"\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml.*not UTF-8"):
        load_product_file(latin)
    twice = tmp_path / "twice.yaml"
    twice.write_text("id: twice\nshots: 2\nshots: 4\n")
    with pytest.raises(ConfigError, match=r"(?s)key 'shots' is given twice.*line 3"):
        load_product_file(twice)
    main = tmp_path / "inspectd.yaml"
    main.write_text("batcher: {max_batch_size: 4}\nhttp: {enabled: false}\nbatcher: {max_delay_ms: 5}\n")
    with pytest.raises(ConfigError, match="key 'batcher' is given twice"):
        load_config(main)
    main.write_bytes(b"# caf\xe9\nhttp: {enabled: false}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(main)


def test_check_names_each_bad_product_file_once(tmp_path: Path) -> None:
    products = tmp_path / "products"
    products.mkdir()
    (products / "latin.yaml").write_bytes(b"id: latin\nobject_name: \"caf\xe9\"\n")
    (products / "folder.yaml").mkdir()  # not a product file
    (products / "a1.yaml").write_text("id: hz\nobject_name: hazelnut\n")
    (products / "a2.yaml").write_text("id: hz\nobject_name: bolt\n")
    (products / "noid.yaml").write_text("object_name: bolt\n")
    (products / "slash.yaml").write_text("id: a/b\nobject_name: bolt\n")
    config = tmp_path / "inspectd.yaml"
    config.write_text(f"model: {{arch: inspectd-tiny, pretrained: random}}\ndemo: true\n"
                      f"sources: {{redis: true}}\nregistry: {{products_dir: {products}}}\n")
    out = check(config)
    assert out.returncode == 2, out.stderr
    problems = [line for line in out.stderr.splitlines() if line.startswith("config error at ")]
    assert len(problems) == 4, out.stderr
    assert any(line.startswith("config error at latin.yaml:") and "not UTF-8" in line for line in problems)
    assert any(line.startswith("config error at a2.yaml:") and "already defined by a1.yaml" in line
               for line in problems)
    assert any(line.startswith("config error at noid.yaml:") and line.count("config error at") == 1
               for line in problems), problems
    assert any(line.startswith("config error at slash.yaml.id:") for line in problems), problems
    assert "4 problem(s)" in out.stderr


def test_of_two_files_defining_one_product_the_one_named_after_it_wins(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("id: hz\nobject_name: bolt\n")
    (tmp_path / "hz.yaml").write_text("id: hz\nobject_name: hazelnut\n")
    defined, rejected, duplicates = load_product_dir(str(tmp_path))
    assert defined["hz"][0].name == "hz.yaml" and defined["hz"][1].object_name == "hazelnut"
    assert list(rejected) == [tmp_path / "a.yaml"] and "already defined by hz.yaml" in rejected[tmp_path / "a.yaml"]
    assert duplicates == {tmp_path / "a.yaml"}


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_the_daemon_skips_bad_files_and_serves_the_rest_at_start_and_when_they_change(
        redis_url, key_prefix, tmp_path, tiny_backbone) -> None:
    """A non-UTF-8 product file used to stop the daemon at start (an uncaught UnicodeDecodeError); a second file
    for a serving product silently replaced it."""
    products = tmp_path / "products"
    products.mkdir()
    (products / "latin.yaml").write_bytes(b"id: latin\nobject_name: \"caf\xe9\"\n")
    (products / "folder.yaml").mkdir()
    (products / "hz.yaml").write_text("id: hz\nobject_name: hazelnut\n")
    (products / "a2.yaml").write_text("id: hz\nobject_name: bolt\n")
    config = daemon_config(redis_url, key_prefix, tmp_path, sources={"redis": False}, sinks={"redis": False},
                           products=[], registry={"products_dir": str(products), "watch": True, "debounce_s": 0.2})
    daemon = InspectDaemon(config, backbone=tiny_backbone)
    await daemon.start()
    try:
        registry = daemon.registry
        assert registry.get("hz").config.object_name == "hazelnut"  # its own file, not the duplicate
        assert "not UTF-8" in (registry.error("latin") or "")
        assert registry.status("a2") is None  # a duplicate is no product of its own: nothing to wait for
        assert registry.status("latin") == "failed" and not registry.all_ready()  # the product latin.yaml meant
        (products / "latin.yaml").write_text("id: latin\nobject_name: cafe\n")  # fixed
        await until(lambda: registry.get("latin") is not None, 15, "latin.yaml fixed")
        assert registry.all_ready()  # the duplicate holds nothing up
        errors = daemon.watcher.errors
        (products / "a2.yaml").write_text("id: hz\nobject_name: washer\n")  # still a duplicate: rejected
        await until(lambda: daemon.watcher.errors > errors, 10, "the duplicate rejected")
        assert registry.get("hz").version == 1 and registry.get("hz").config.object_name == "hazelnut"
        (products / "hz.yaml").unlink()  # now a2.yaml is the only file defining hz: it serves
        await until(lambda: registry.get("hz") is not None and registry.get("hz").config.object_name == "washer",
                    15, "a2.yaml's definition")
    finally:
        await daemon.shutdown()


def test_relative_paths_are_relative_to_the_file_that_names_them_whatever_the_cwd(tmp_path: Path,
                                                                                  tiny_checkpoint: Path) -> None:
    """A model folder, a token file and a product's learned-part file named relative to their config or product
    file resolve the same from any working directory (they used to be taken relative to the cwd: `--check` passed
    from one folder and failed from another, and a relative `pretrained` folder was taken for a tag)."""
    site = tmp_path / "site"
    (site / "products").mkdir(parents=True)
    (site / "clip").symlink_to(tiny_checkpoint, target_is_directory=True)
    (site / "products" / "ffn.safetensors").write_bytes(b"not read by --check")
    (site / "products" / "rw.yaml").write_text("id: rw\ndetector: randword\noptions: {ffn: ffn.safetensors}\n")
    (site / "inspectd.yaml").write_text("model: {arch: inspectd-tiny, pretrained: clip, device: cpu}\n"
                                        "sources: {redis: true}\nhttp: {token_file: secrets/admin-token}\n"
                                        "registry: {products_dir: products}\n"
                                        "products: [{id: inline, detector: randword, "
                                        "options: {ffn: products/ffn.safetensors}}]\n")
    for cwd in (tmp_path, site / "products", Path("/")):
        out = subprocess.run([sys.executable, "-m", "inspectd.cli", "run", "--config", str(site / "inspectd.yaml"),
                              "--check"], capture_output=True, text=True, timeout=120, cwd=cwd,
                             env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert out.returncode == 0 and "config OK" in out.stdout, (cwd, out.stderr)
    config = load_config(site / "inspectd.yaml")
    assert config.model.pretrained == str(tiny_checkpoint.resolve())
    assert config.http.token_file == str(site / "secrets" / "admin-token")
    assert config.products[0].options["ffn"] == str(site / "products" / "ffn.safetensors")
    assert load_product_file(site / "products" / "rw.yaml").options["ffn"] == str(site / "products" / "ffn.safetensors")


async def test_product_put_refuses_a_product_every_daemon_would_reject_and_sends_nothing(tmp_path: Path, redis_url,
                                                                                    redis_client, key_prefix) -> None:
    from inspectd.cli import main as cli_main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"id: a/b\ndetector: nosuch\nreferences: {tmp_path / 'missing'}\nshots: 2\n")
    stream = f"{key_prefix}:control"
    assert cli_main(["product", "put", str(bad), "--redis", redis_url, "--stream", stream]) == 2
    good = tmp_path / "good.yaml"
    good.write_text("id: good\nobject_name: bolt\nshots: 0\n")
    assert cli_main(["product", "put", str(good), "--redis", redis_url, "--stream", stream]) == 0
    entries = await redis_client.xrange(stream)
    assert [fields[b"product"] for _, fields in entries] == [b"good"]


def test_the_api_writes_and_deletes_the_file_that_defines_a_product_and_no_other(tmp_path: Path,
                                                                                 tiny_backbone) -> None:
    """x.yaml defines product y: a PUT of product x used to overwrite it (and the watcher then removed y), and a
    DELETE of x deleted y's file. The file a product is written to is the one a start reads it from."""
    from inspectd.daemon.config import ProductConfig, RegistryConfig, build
    from inspectd.daemon.registry import ProductRegistry

    (tmp_path / "x.yaml").write_text("id: y\nobject_name: bolt\n")
    (tmp_path / "broken.yaml").write_text("id: [\n")
    registry = ProductRegistry(tiny_backbone, RegistryConfig(products_dir=str(tmp_path), watch=False))
    try:
        assert registry.product_file("y") == tmp_path / "x.yaml"
        written = registry.save_product_file(build(ProductConfig, {"id": "x", "object_name": "nut"}, ""))
        assert written == tmp_path / "x-1.yaml" and load_product_file(tmp_path / "x.yaml").id == "y"
        assert registry.product_file("x") == tmp_path / "x-1.yaml"
        assert registry.save_product_file(build(ProductConfig, {"id": "broken"}, "")) == tmp_path / "broken.yaml"
        assert registry.delete_product_file("x") == tmp_path / "x-1.yaml"
        assert (tmp_path / "x.yaml").is_file()
        assert registry.delete_product_file("y") == tmp_path / "x.yaml"
        assert load_product_dir(str(tmp_path)).defined.keys() == {"broken"}
    finally:
        registry.close()


def test_a_product_sent_with_relative_paths_reads_the_same_from_the_file_it_is_saved_in(tmp_path: Path,
                                                                                         tiny_backbone) -> None:
    """Through the admin API or the control stream, relative paths (the learned-part files too) are taken relative
    to products_dir, where the product is saved: its file, read by the watcher or the next start, gives the same
    config (an `ffn` taken relative to the cwd made the file's echo look like a change and rebuild elsewhere)."""
    import json

    from inspectd.daemon.admin import parse_product
    from inspectd.daemon.config import RegistryConfig
    from inspectd.daemon.control import command_fields, parse_command
    from inspectd.daemon.registry import ProductRegistry

    products = tmp_path / "products"
    products.mkdir()
    registry = ProductRegistry(tiny_backbone, RegistryConfig(products_dir=str(products), watch=False))
    body = {"detector": "randword", "options": {"ffn": "models/ffn.safetensors"}, "references": "refs/rw",
            "threshold": {"holdout_dir": "holdout/rw"}}
    try:
        sent = parse_product(json.dumps(body).encode(), "application/json", "rw", registry)
        _, _, commanded = parse_command(command_fields("put", "rw", body), str(products))
        for config in (sent, commanded):
            assert config.options["ffn"] == str(products / "models" / "ffn.safetensors")
            assert config.references == str(products / "refs" / "rw")
            assert config.threshold.holdout_dir == str(products / "holdout" / "rw")
        assert load_product_file(registry.save_product_file(sent)) == sent
    finally:
        registry.close()


async def test_a_few_shot_product_without_references_says_it_runs_zero_shot(tiny_backbone, caplog) -> None:
    """`shots: 4` (the default) and no `references`: it builds zero-shot with the default threshold, which used to
    happen without a word."""
    import logging

    from inspectd.daemon.config import ProductConfig, RegistryConfig, build
    from inspectd.daemon.registry import ProductRegistry

    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False))
    try:
        with caplog.at_level(logging.WARNING, logger="inspectd.daemon.registry"):
            entry = await registry.put(build(ProductConfig, {"id": "forgot", "object_name": "bolt"}, ""))
    finally:
        registry.close()
    assert entry.state.meta.get("shots", 0) == 0
    assert any("shots is 4 but no `references` folder" in r.getMessage() and "uncalibrated default threshold 0.5"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
