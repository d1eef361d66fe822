"""Atomic writes (inspectd.atomic): a target is replaced whole or not at all, no temporary file stays behind, and
concurrent writers of one file do not collide (the registry's product files, the console's feedback, uploads,
artifacts, training checkpoints and the eval cache all write through it)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from inspectd import atomic
from inspectd.daemon.config import ProductConfig, RegistryConfig
from inspectd.daemon.registry import ProductRegistry


def test_a_write_replaces_the_target_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.yaml"
    atomic.write_text(target, "one")
    atomic.write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.yaml"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_bytes(b"half")
        assert tmp.name.startswith(".") and tmp.suffix == ".tmp"  # what builds and the folder watcher skip
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_concurrent_saves_of_one_product_file_all_succeed(tiny_backbone: object, tmp_path: Path) -> None:
    """Two console feedbacks or an admin PUT beside a reload save the same product file from different threads;
    with one fixed temporary name the second rename found no file (FileNotFoundError)."""
    registry = ProductRegistry(tiny_backbone, RegistryConfig(watch=False, products_dir=str(tmp_path)))
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def save(shots: int) -> None:
        barrier.wait()
        try:
            for _ in range(40):
                registry.save_product_file(ProductConfig(id="bottle", shots=shots))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(shots,)) for shots in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["bottle.yaml"]
    assert yaml.safe_load((tmp_path / "bottle.yaml").read_text())["shots"] in range(4)
