"""Values `run` would reject only after loading the model and building every product (or that silently break scoring)
fail at load, naming the key, so `run --check` reports them and `run` exits 2 at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from inspectd.cli import main
from inspectd.daemon.config import ConfigError, load_product_file, parse_config

FOLDER = {"path": "/tmp"}
CAMERA = {"name": "cam", "uri": "0", "product": "nut"}

BAD = [
    # (config, the key the error names)
    ({"redis": {"lines": ["bad line"]}}, "redis.lines[0]"),
    ({"redis": {"lines": ["ok", "a{b}"]}}, "redis.lines[1]"),
    ({"redis": {"lines": [""]}}, "redis.lines[0]"),
    ({"redis": {"lines": []}}, "redis.lines"),
    ({"redis": {"prefix": "a{b}"}}, "redis.prefix"),
    ({"redis": {"max_deliveries": -1}}, "redis.max_deliveries"),
    ({"redis": {"block_ms": -1}}, "redis.block_ms"),
    ({"redis": {"claim_idle_ms": 0}}, "redis.claim_idle_ms"),
    ({"redis": {"results_maxlen": -5}}, "redis.results_maxlen"),
    ({"redis": {"results_maxlen": 0}}, "redis.results_maxlen"),
    ({"redis": {"maintenance_interval_s": 0}}, "redis.maintenance_interval_s"),
    ({"sources": {"folders": [{**FOLDER, "after": "bogus"}]}}, "sources.folders[0].after"),
    ({"sources": {"folders": [FOLDER, {**FOLDER, "line": "bad line"}]}}, "sources.folders[1].line"),
    ({"sources": {"folders": [{**FOLDER, "poll_interval_s": 0}]}}, "sources.folders[0].poll_interval_s"),
    ({"sources": {"folders": [{**FOLDER, "settle_s": -1}]}}, "sources.folders[0].settle_s"),
    ({"sources": {"cameras": [{**CAMERA, "policy": "bogus"}]}}, "sources.cameras[0].policy"),
    ({"sources": {"cameras": [{**CAMERA, "line": "bad line"}]}}, "sources.cameras[0].line"),
    ({"sources": {"cameras": [{**CAMERA, "queue_size": 0}]}}, "sources.cameras[0].queue_size"),
    ({"sources": {"cameras": [{**CAMERA, "backoff_initial_s": 0}]}}, "sources.cameras[0].backoff_initial_s"),
    ({"sources": {"cameras": [{**CAMERA, "backoff_max_s": 0.1}]}}, "sources.cameras[0].backoff_max_s"),
    ({"sources": {"cameras": [{**CAMERA, "max_fps": -1}]}}, "sources.cameras[0].max_fps"),
    ({"http": {"port": 70000}}, "http.port"),
    ({"http": {"port": -1}}, "http.port"),
    ({"http": {"max_body_bytes": 0}}, "http.max_body_bytes"),
    ({"decode": {"max_bytes": -1}}, "decode.max_bytes"),
    ({"decode": {"max_pixels": 0}}, "decode.max_pixels"),
    ({"decode": {"threads": -2}}, "decode.threads"),
    ({"shutdown_timeout_s": -1}, "shutdown_timeout_s"),
    ({"sinks": {"publish_stall_s": 0}}, "sinks.publish_stall_s"),
    ({"registry": {"wait_timeout_s": -1}}, "registry.wait_timeout_s"),
    ({"model": {"threads": -3}}, "model.threads"),
    ({"models": [{"name": "a"}, {"name": "b", "threads": -3}]}, "models[1].threads"),
    ({"products": [{"id": "a"}, {"id": "b", "shots": -2}]}, "products[1].shots"),
    ({"products": [{"id": "a", "threshold": {"value": float("nan")}}]}, "products[0].threshold.value"),
    ({"products": [{"id": "a", "threshold": {"value": float("inf")}}]}, "products[0].threshold.value"),
    ({"products": [{"id": "a", "threshold": {"margin": float("nan")}}]}, "products[0].threshold.margin"),
    ({"products": [{"id": "a", "threshold": {"default": float("nan")}}]}, "products[0].threshold.default"),
]


@pytest.mark.parametrize(("data", "key"), BAD, ids=[key for _, key in BAD])
def test_a_bad_value_fails_at_load_naming_its_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config error at {re.escape(key)}: ") as error:
        parse_config(data)
    assert error.value.path == key


GOOD = [
    # values that mean something (off, auto, ephemeral) stay accepted
    {"http": {"port": 0}},  # an ephemeral port
    {"http": {"port": 65535}},
    {"redis": {"max_deliveries": 0}},  # 0 = never dead-letter redelivered frames
    {"redis": {"block_ms": 0}},  # 0 = reads do not block
    {"redis": {"lines": [], "prefix": ""}, "sources": {"redis": False}},  # lines unused without the redis source
    {"decode": {"threads": -1}},  # auto
    {"decode": {"threads": 0}},
    {"model": {"threads": 0}},  # leave torch's default
    {"shutdown_timeout_s": 0},
    {"registry": {"wait_timeout_s": 0}},
    {"sources": {"folders": [{**FOLDER, "after": "record", "settle_s": 0, "line": "l-2"}],
                 "cameras": [{**CAMERA, "policy": "queue", "max_fps": 0, "backoff_max_s": 0.5}]}},
    {"products": [{"id": "a", "shots": 0, "threshold": {"value": 0.3}}, {"id": "b", "threshold": {"value": None}}]},
]


@pytest.mark.parametrize("data", GOOD)
def test_meaningful_edge_values_are_accepted(data: dict[str, Any]) -> None:
    parse_config(data)


def test_a_product_files_bad_value_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "widget.yaml"
    path.write_text("id: widget\nshots: -2\n")
    with pytest.raises(ConfigError, match=r"^config error at widget\.shots: must be >= 0"):
        load_product_file(path)
    path.write_text("id: widget\nthreshold: {value: .nan}\n")
    with pytest.raises(ConfigError, match=r"^config error at widget\.threshold\.value: "):
        load_product_file(path)


@pytest.mark.parametrize(("section", "key"), [
    ({"redis": {"lines": ["bad line"]}}, "redis.lines[0]"),
    ({"sources": {"redis": True, "folders": [{"path": "{tmp}", "after": "bogus"}]}}, "sources.folders[0].after"),
    ({"decode": {"max_bytes": -1}}, "decode.max_bytes"),
    ({"products": [{"id": "nut", "threshold": {"value": float("nan")}}]}, "products[0].threshold.value"),
])
def test_run_check_exits_2_naming_the_key(section: dict[str, Any], key: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = {"model": {"arch": "inspectd-tiny", "pretrained": "random"}, "demo": True, "http": {"enabled": False},
              **section}
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config).replace("{tmp}", str(tmp_path)))
    assert main(["run", "--config", str(path), "--check"]) == 2
    captured = capsys.readouterr()
    assert f"config error at {key}: " in captured.err and "config OK" not in captured.out


def test_a_model_setting_is_named_where_it_is_whether_in_model_or_in_models() -> None:
    """Every ModelConfig check names the key where it sits: `models[1].precision`, not `model.precision`."""
    from inspectd.daemon.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"models": [{"name": "a"}, {"name": "b", "precision": "fp8"}]})
    assert err.value.path == "models[1].precision"
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"compile": "default", "cpu_kernels": "onednn"}})
    assert err.value.path == "model.compile"


def test_run_port_flag_is_range_checked_like_http_port(capsys: pytest.CaptureFixture[str]) -> None:
    from inspectd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--demo", "--port", "70000", "--check"])
    assert exit_.value.code == 2 and "--port: must be within [0, 65535]" in capsys.readouterr().err


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    from inspectd.daemon.config import ConfigError, parse_config

    assert parse_config({"http": {"trusted_proxies": ["10.0.0.0/8", "::1", "127.0.0.1"]}}).http.trusted_proxies
    with pytest.raises(ConfigError) as err:
        parse_config({"http": {"trusted_proxies": ["10.0.0.0/8", "nginx.local"]}})
    assert err.value.path == "http.trusted_proxies[1]"
