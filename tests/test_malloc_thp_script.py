"""`benchmarks/bench_malloc_thp.py`: it reads the kernel's THP mode, runs every variant under every setting in
each round with two steps for the peak, and divides by the same variant's fixed-threshold time."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_malloc_thp  # noqa: E402
from bench_malloc_thp import SETTINGS, VARIANTS  # noqa: E402


def test_the_thp_setting_is_the_fixed_threshold_plus_the_variable():
    assert SETTINGS["fixed threshold + THP_MEM_ALLOC_ENABLE=1"] == {**SETTINGS["fixed threshold"],
                                                                   "THP_MEM_ALLOC_ENABLE": "1"}


def test_main_runs_each_variant_under_each_setting_per_round(monkeypatch):
    calls, saved = [], {}
    seconds = {"fixed threshold": 2.0, "fixed threshold + THP_MEM_ALLOC_ENABLE=1": 1.5,
               "MALLOC_MMAP_MAX_=0 (the timing setting)": 1.0}

    def fake_child(size, variant, spec, *, environment, steps, timed_steps):
        setting = next(name for name, env in SETTINGS.items() if env == environment)
        calls.append((size, variant, spec, setting, steps, timed_steps))
        huge = 96 * 2**20 if "THP_MEM_ALLOC_ENABLE" in environment else 0
        return {"seconds_by_step": [seconds[setting]] * timed_steps, "peak_rss": 2**30,
                "huge_pages_by_step": [huge] * steps}

    monkeypatch.setattr(bench_malloc_thp, "run_child", fake_child)
    monkeypatch.setattr(bench_malloc_thp, "save", lambda name, env, tables, data: saved.update(tables))
    monkeypatch.setattr(sys, "argv", ["bench_malloc_thp.py", "--size", "64", "--rounds", "2", "--timed-steps", "3"])
    bench_malloc_thp.main()
    assert len(calls) == 2 * len(VARIANTS) * len(SETTINGS)
    assert {call[4:] for call in calls} == {(2, 3)}  # two steps for the peak (Adam's state included), three timed
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in saved["malloc_thp"].splitlines()[2:]]
    ratios = {(row[0], row[1]): row[5] for row in rows}
    huge = {(row[0], row[1]): row[7] for row in rows}
    assert huge[(VARIANTS[0], "fixed threshold + THP_MEM_ALLOC_ENABLE=1")] == "96"
    assert huge[(VARIANTS[1], "fixed threshold")] == "0"
    assert ratios[(VARIANTS[0], "fixed threshold + THP_MEM_ALLOC_ENABLE=1")] == "0.75"
    assert ratios[(VARIANTS[1], "MALLOC_MMAP_MAX_=0 (the timing setting)")] == "0.5"


def test_huge_pages_give_the_range_over_the_rounds():
    assert bench_malloc_thp.huge_pages_mib([2**20, 3 * 2**20]) == "1-3"
    assert bench_malloc_thp.huge_pages_mib([0, 0]) == "0"
    assert bench_malloc_thp.huge_pages_mib([None, None]) == "-"
