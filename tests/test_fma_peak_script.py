"""`benchmarks/fma_peak.py`: the FMA loop does the work it counts, and the 0.5x-MONAI arithmetic built on it."""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_train_step import half_of_monai  # noqa: E402
from fma_peak import FmaPeak, compile_library, run_threads  # noqa: E402

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                    reason="no C compiler ($CC, else cc) to build fma_peak.c")


@pytest.fixture(scope="module")
def library():
    built = compile_library()
    assert built is not None, "cc is on PATH but fma_peak.c did not build"
    if built.fma_lanes() == 0:
        pytest.skip("this CPU has neither AVX-512 nor AVX2 with FMA")
    return built


@needs_compiler
@pytest.mark.parametrize("iterations", [1, 7, 1000])
def test_every_thread_runs_every_fma_it_counts(library, iterations):
    # acc = acc * 1 + 1 on chain i (started at i) ends at i + iterations in every lane: the loop ran in full.
    lanes, chains = library.fma_lanes(), library.fma_chains()
    expected = lanes * (sum(range(chains)) + chains * iterations)
    assert run_threads(library, threads=3, iterations=iterations, a=1.0, b=1.0) == [expected] * 3


@needs_compiler
def test_flops_count_one_multiply_and_one_add_per_lane_per_fma(library):
    peak = FmaPeak(library, threads=2, iterations=500)
    assert peak.flops == 2 * library.fma_lanes() * library.fma_chains() * 500 * 2
    assert peak.label == f"fp32 FMA peak ({'AVX-512' if library.fma_lanes() == 16 else 'AVX2'}, 2 threads)"
    assert len(peak()) == 2


@needs_compiler
def test_build_sizes_a_run_to_the_seconds_asked(library):
    short, longer = FmaPeak.build(threads=1, seconds=0.01), FmaPeak.build(threads=1, seconds=0.1)
    assert 4 <= longer.iterations / short.iterations <= 25


def test_without_a_compiler_there_is_no_peak_row_and_the_reason_is_printed(monkeypatch, capsys):
    monkeypatch.setenv("CC", "no-such-compiler-cpcbm")
    assert FmaPeak.build(threads=2, seconds=0.1) is None
    assert "no C compiler ('no-such-compiler-cpcbm' not on PATH)" in capsys.readouterr().out


def test_half_of_monai_is_our_flops_in_half_of_monais_median_time():
    times = {"MONAI": [9.0, 10.0, 30.0], "cpcbm_blocks": [6.0, 5.0, 4.0]}
    row = half_of_monai(128, our_flops=400 * 10**9, times=times, peak_rate=200e9)
    # MONAI's median 10 s: 0.5x is 5 s, so 400 GFLOP must run at 80 GFLOP/s, 0.4 of the peak;
    # ours took 5 s (median) for them, 80 GFLOP/s, also 0.4.
    assert row == ["1,1,8,128,128", 10.0, 5.0, 400.0, 80.0, 200.0, 0.4, 0.4]
