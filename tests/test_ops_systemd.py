"""The systemd unit: required keys present, and `systemd-analyze verify` clean where the tool exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD / "inspectd.service"
EXEC = "/opt/inspectd/venv/bin/inspectd"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value (repeatable keys), # and ; comments, trailing-\\ continuation."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= missing"
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    """systemd time spans used here: '30', '30s', '5min', '1min 30s'."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == value.replace(" ", ""), value
    return sum(float(n) * units[u] for n, u in parts)


def test_required_service_keys(unit: dict[str, dict[str, list[str]]]) -> None:
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "DynamicUser": "no",
        "User": "inspectd", "Group": "inspectd", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "NoNewPrivileges": "yes", "KillSignal": "SIGTERM",
        "ExecStart": f"{EXEC} run --config /etc/inspectd/inspectd.yaml",
        "EnvironmentFile": "-/etc/inspectd/inspectd.env", "StateDirectory": "inspectd", "CacheDirectory": "inspectd",
    }
    for key, value in expected.items():
        assert one(unit, key) == value, key
    assert seconds(one(unit, "WatchdogSec")) == 30
    assert seconds(one(unit, "RestartSec")) > 0
    assert set(one(unit, "ReadWritePaths").split()) == {"/var/lib/inspectd", "/var/cache/inspectd",
                                                         "-/etc/inspectd/products"}
    assert int(one(unit, "LimitNOFILE")) >= 4096
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_stop_timeout_bounds_the_graceful_shutdown(unit: dict[str, dict[str, list[str]]]) -> None:
    """TimeoutStopSec must outlast the daemon's own drain bound (shutdown_timeout_s), or systemd SIGKILLs mid-drain."""
    from inspectd.daemon.config import DaemonConfig

    assert seconds(one(unit, "TimeoutStopSec")) >= DaemonConfig().shutdown_timeout_s + 5
    assert one(unit, "KillMode") in {"mixed", "control-group"}
    assert seconds(one(unit, "TimeoutStartSec")) >= 60  # READY=1 only after the model loads


def test_env_example_names_the_documented_variables() -> None:
    text = (SYSTEMD / "inspectd.env.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    assert {"INSPECTD_REDIS_URL", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "INSPECTD_ADMIN_TOKEN"} <= names
    assert re.search(r"^HF_HUB_OFFLINE=1$", text, re.M)
    readme = (SYSTEMD / "README.md").read_text()
    for step in ("useradd --system", "/opt/inspectd/venv", "systemctl daemon-reload", "enable --now", "journalctl"):
        assert step in readme, step


def test_parser_rejects_what_it_should() -> None:
    parsed = parse_unit("[Service]\nEnvironment=A=1\nEnvironment=B=2 \\\n  C=3\n# c\n")
    assert parsed["Service"]["Environment"] == ["A=1", "B=2 C=3"]
    with pytest.raises(AssertionError):
        parse_unit("Type=notify\n")


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verify a copy whose commands point at /bin/true (the venv isn't installed here); the real file
    may complain only about exactly that missing executable."""
    probe = tmp_path / "probe" / "inspectd-probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    baseline = _verify(probe)
    if baseline.returncode != 0 or (baseline.stdout + baseline.stderr).strip():
        pytest.skip(f"systemd-analyze cannot verify here: {(baseline.stdout + baseline.stderr).strip()[:200]}")

    copy = tmp_path / "inspectd.service"  # same name: verify checks the unit name against its type
    copy.write_text(UNIT.read_text().replace(EXEC, "/bin/true"))
    checked = _verify(copy)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr

    real = _verify(UNIT)
    complaints = [line for line in (real.stdout + real.stderr).splitlines() if line.strip()]
    if Path(EXEC).exists():
        assert real.returncode == 0 and not complaints, complaints
    else:
        allowed = f"inspectd.service: Command {EXEC} is not executable: No such file or directory"
        assert complaints and all(line == allowed for line in complaints), complaints


def test_every_path_the_shipped_config_writes_is_writable_under_the_unit(unit: dict[str, dict[str, list[str]]],
                                                                        tmp_path: Path) -> None:
    """ProtectSystem=strict makes every path read-only but ReadWritePaths=: the shipped config's products_dir
    (/etc/inspectd/products, where the admin API and console feedback save product files) was not among them, so
    each PUT built and served its product, then failed with EROFS and was gone after a restart."""
    import yaml

    from inspectd.daemon.config import load_config

    etc = tmp_path / "etc" / "inspectd"  # the config as installed: /etc/inspectd/inspectd.yaml
    etc.mkdir(parents=True)
    (etc / "products").mkdir()
    data = yaml.safe_load((SYSTEMD.parent / "config" / "inspectd.yaml").read_text())
    (etc / "inspectd.yaml").write_text(yaml.safe_dump(data))
    config = load_config(etc / "inspectd.yaml")

    def installed(path: str) -> Path:  # where it lies on the machine
        p = Path(path)
        return Path("/etc/inspectd") / p.relative_to(etc) if p.is_relative_to(etc) else p

    written = {"registry.products_dir": config.registry.products_dir,
               "registry.state_cache_dir": config.registry.state_cache_dir,
               "console.feedback_dir": config.console.feedback_dir, "sinks.jsonl": config.sinks.jsonl}
    writable = [Path(p.lstrip("-")) for v in unit["Service"]["ReadWritePaths"] for p in v.split()]
    writable += [Path("/var/lib") / v for v in unit["Service"].get("StateDirectory", [])]
    writable += [Path("/var/cache") / v for v in unit["Service"].get("CacheDirectory", [])]
    for key, path in written.items():
        if path:
            where = installed(path)
            assert any(where.is_relative_to(w) for w in writable), f"{key} {where} not in {writable}"
