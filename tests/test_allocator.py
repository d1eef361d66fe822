"""`allocator: keep`: the heap keeps what a batch freed, so scoring stops faulting in fresh pages every batch."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bench.allocator import measure
from inspectd import allocator
from inspectd.daemon.config import ConfigError, parse_config


def median_faults_per_frame(measured: dict, batch: int) -> float:
    """The middle batch's page faults per frame: a batch that first touches heap pages the heap grew into (a few
    in any fresh process) does not count, a heap that maps and faults in its pages anew every batch does."""
    return float(np.median(measured["call_faults"])) / batch


@pytest.mark.skipif(allocator._glibc() is None or "malloc" in os.environ.get("LD_PRELOAD", ""),
                    reason="glibc's malloc is not this process's")
def test_keep_stops_the_page_faults_of_every_batch() -> None:
    """The daemon's CPU engine path (PNG decode, pre-processing, tiny WinCLIP) in fresh processes. With glibc's
    defaults, a thread arena's heap goes back to the kernel as soon as its top is free and is mapped and faulted in
    again by the next batch; whether that happens every batch depends on where long-lived blocks happened to land,
    so it shows in most fresh processes, not in all (one in eight kept its heaps for most batches): up to three
    are tried. With `keep` the heaps stay in every process: two must show it. (A heap still grows into new pages
    for a while: on an AVX2 CPU, whose blocks run their GEMMs on MKL, 28 faults a batch of 16 for its first ~750
    batches, RSS flat after; glibc's defaults: 2 000-9 000 a batch.)"""
    batch, seconds = 16, 1.5
    for _ in range(2):
        keep = measure("keep", batch=batch, seconds=seconds)
        assert keep["applied"]
        assert len(keep["call_faults"]) >= 3, keep
        assert median_faults_per_frame(keep, batch) < 4, keep
    for _ in range(3):
        system = measure("system", batch=batch, seconds=seconds)
        assert not system["applied"]
        if system["faults_per_frame"] > 20:
            break
    assert system["faults_per_frame"] > 20, system


def test_the_choice_is_validated_where_it_is_read() -> None:
    assert parse_config({}).allocator == "keep"
    assert parse_config({"allocator": "system"}).allocator == "system"
    with pytest.raises(ConfigError, match="allocator"):
        parse_config({"allocator": "jemalloc"})
    with pytest.raises(ValueError, match="allocator"):
        allocator.apply("tcmalloc")
    assert allocator.apply("system") is False  # nothing is set: glibc's defaults stay
