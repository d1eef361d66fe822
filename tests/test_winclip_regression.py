"""WinCLIP scores on the shared images equal the values recorded before the fitting/training redesign."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from inspectd.detectors.backbone import ClipBackbone

HERE = Path(__file__).resolve().parent / "data"


def _recorder():
    spec = importlib.util.spec_from_file_location("record_winclip_reference", HERE / "record_winclip_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_winclip_scores_and_maps_equal_the_recorded_values(tiny_backbone: ClipBackbone) -> None:
    expected = json.loads((HERE / "winclip_reference.json").read_text())
    got = _recorder().record(tiny_backbone)
    assert got.keys() == expected.keys()
    for case in expected:
        for want, have in zip(expected[case], got[case], strict=True):
            assert have["frame"] == want["frame"]
            assert have["score"] == pytest.approx(want["score"], abs=1e-5), (case, want["frame"])
            assert have["map"]["shape"] == want["map"]["shape"]
            np.testing.assert_allclose(have["map"]["samples"], want["map"]["samples"], atol=1e-5)
            assert have["map"]["mean"] == pytest.approx(want["map"]["mean"], abs=1e-5)
            assert have["map"]["max"] == pytest.approx(want["map"]["max"], abs=1e-5)
