"""The report's ceilings: the physical peak measured by bench/fma_peak.c really is what the cores can do at once,
and the peak kept from the start and end measurements is stated with the figures it was taken from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import peak, report
from bench.run import merge_ceilings


def physical(measured: dict[str, float], threads: int = 2) -> dict[str, object]:
    """A physical-peak dict as bench/peak.py's physical_peak builds it from the kernel's figures."""
    return {"measured": True, "isa": "avx2", "threads": threads, "build": "gcc", "bf16_gflops": None, **measured,
            **peak.peak_of(measured, threads)}


def test_a_peak_taken_from_the_end_measurement_states_the_end_figures() -> None:
    crowded = physical({"fp32_gflops": 60.0, "fp32_gflops_1thread": 46.0})  # start: a neighbour on a core
    quiet = physical({"fp32_gflops": 183.0, "fp32_gflops_1thread": 91.5})  # end
    gemm = {"bound_fp32": 150.0, "mm_fp32": 140.0, "width": 896.0, "square": 2048.0}
    merged = merge_ceilings({"physical": crowded, "gemm": gemm}, {"physical": quiet, "gemm": gemm})
    got = merged["physical"]
    assert got["fp32_gflops"] == 183.0 and got["fp32_gflops_start"] == 92.0 and got["fp32_gflops_end"] == 183.0
    assert (got["fp32_basis"], got["fp32_gflops_all_threads"], got["fp32_gflops_1thread"]) == \
        ("all threads", 183.0, 91.5)
    text = report.render_markdown({"peak": merged})
    assert "| 183.0 | bench/fma_peak.c built with gcc; taken from all threads (all threads measured 183.0, 1 thread " \
        "91.50) |" in text
    # the start stays where it was the higher one
    merged = merge_ceilings({"physical": quiet, "gemm": gemm}, {"physical": crowded, "gemm": gemm})
    assert (merged["physical"]["fp32_gflops"], merged["physical"]["fp32_basis"]) == (183.0, "all threads")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_threads_that_ran_one_after_the_other_on_one_core_give_one_cores_peak(tmp_path: Path) -> None:
    """Two kernel threads on one core under SCHED_FIFO run back to back, each alone for its whole run: timed by each
    thread's own clock they looked parallel and the "all threads" figure was twice what the core can do."""
    flags = peak.cpu_flags()
    if peak.kernel_isa(flags) is None:
        pytest.skip("CPU without AVX2 + FMA")
    binary, how = peak.build_kernel(tmp_path, flags)
    assert binary is not None, how
    cpu = max(os.sched_getaffinity(0))

    def one_core_fifo() -> None:
        os.sched_setaffinity(0, {cpu})
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))

    try:
        done = subprocess.run([str(binary), "2", "0.02"], capture_output=True, text=True, timeout=60,
                              preexec_fn=one_core_fifo, check=True)
    except subprocess.SubprocessError as exc:  # no CAP_SYS_NICE here: the scheduling cannot be forced
        pytest.skip(f"SCHED_FIFO not permitted: {exc}")
    result = json.loads(done.stdout)
    assert result["threads"] == 2
    assert result["fp32_gflops"] <= 1.25 * result["fp32_gflops_1thread"], result
