"""`allocator: keep`: the heap keeps what a batch freed, so scoring stops faulting in fresh pages every batch."""

from __future__ import annotations

import os

import pytest

from bench.allocator import measure
from inspectd import allocator
from inspectd.daemon.config import ConfigError, parse_config


@pytest.mark.skipif(allocator._glibc() is None or "malloc" in os.environ.get("LD_PRELOAD", ""),
                    reason="glibc's malloc is not this process's")
def test_keep_stops_the_page_faults_of_every_batch() -> None:
    """The daemon's CPU engine path (PNG decode, pre-processing, tiny WinCLIP) in fresh processes: with glibc's
    defaults each batch maps and faults in new pages; with `keep` it reuses the heap's."""
    system = measure("system", batch=16, seconds=0.5)
    keep = measure("keep", batch=16, seconds=0.5)
    assert keep["applied"] and not system["applied"]
    assert system["faults_per_frame"] > 20, system
    assert keep["faults_per_frame"] < system["faults_per_frame"] / 10, (keep, system)


def test_the_choice_is_validated_where_it_is_read() -> None:
    assert parse_config({}).allocator == "keep"
    assert parse_config({"allocator": "system"}).allocator == "system"
    with pytest.raises(ConfigError, match="allocator"):
        parse_config({"allocator": "jemalloc"})
    with pytest.raises(ValueError, match="allocator"):
        allocator.apply("tcmalloc")
    assert allocator.apply("system") is False  # nothing is set: glibc's defaults stay
