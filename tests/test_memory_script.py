"""`benchmarks/bench_memory.py`: its child reports what the tables need, and the trade-off table's ratios are right."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import FIXED_THRESHOLD, MALLOC_SETTINGS, TIMING_SETTING, child, step_seconds, tradeoff_table  # noqa: E402
from common import TUNED_MALLOC  # noqa: E402


def _measured(spec, variant, malloc, seconds, peak_gib):
    return {"spec": spec, "variant": variant, "malloc": malloc, "seconds_by_step": seconds,
            "peak_rss": peak_gib * 2**30}


def _rows(text):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_the_timing_setting_is_the_one_the_other_benchmarks_use():
    assert MALLOC_SETTINGS[TIMING_SETTING][0] == TUNED_MALLOC
    assert MALLOC_SETTINGS[FIXED_THRESHOLD][0] == {"MALLOC_MMAP_THRESHOLD_": "65536"}


def test_step_seconds_is_the_median_of_the_timed_steps():
    assert step_seconds({"seconds_by_step": [30.0, 2.0, 4.0]}) == 4.0


def test_tradeoff_table_divides_by_the_same_variants_timing_and_fixed_threshold_runs():
    peaks = {}
    for variant, scale in (("plain", 1.0), ("checkpointed", 2.0)):
        for malloc, seconds, peak in ((TIMING_SETTING, [1.0, 1.0], 3.0), ("glibc default", [1.5, 1.5], 2.5),
                                      (FIXED_THRESHOLD, [2.0, 2.0], 2.0)):
            peaks[f"{variant}, {malloc}"] = _measured("default", variant, malloc, [s * scale for s in seconds],
                                                      peak * scale)
    rows = {(row[1], row[2]): row for row in _rows(tradeoff_table(peaks))}
    assert len(rows) == 6
    # columns: spec, variant, malloc, step s, time / timing setting, peak RSS GiB, peak RSS / fixed threshold
    assert rows[("plain", "glibc default")][3:] == ["1.5", "1.5", "2.5", "1.25"]
    assert rows[("checkpointed", FIXED_THRESHOLD)][3:] == ["4", "2", "4", "1"]
    assert rows[("checkpointed", TIMING_SETTING)][3:] == ["2", "1", "6", "1.5"]


def test_tradeoff_table_without_a_reference_setting_says_so():
    peaks = {"a": _measured("default", "plain", "glibc default", [1.0], 2.0)}
    assert _rows(tradeoff_table(peaks))[0][4] == "-" and _rows(tradeoff_table(peaks))[0][6] == "-"


def test_child_reports_time_and_memory_of_each_step(capsys):
    child(32, "selective recomputation (default)", "default", "-", 2, 3)
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(measured["peak_rss_by_step"]) == 2 and len(measured["seconds_by_step"]) == 3
    assert all(seconds > 0 for seconds in measured["seconds_by_step"])
    assert measured["planned_peak"] > 0 and measured["peak_rss"] >= measured["baseline_rss"] > 0


def test_run_child_passes_its_setting_and_no_inherited_allocator_variable(monkeypatch):
    import subprocess

    import bench_memory

    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    seen = {}

    def fake_run(command, *, env, **kwargs):
        seen["command"], seen["env"] = command, env
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps({"seconds_by_step": [1.0]}) + "\n")

    monkeypatch.setattr(bench_memory.subprocess, "run", fake_run)
    measured = bench_memory.run_child(64, "plain PyTorch (selective off)", "default",
                                      environment={"MALLOC_MMAP_THRESHOLD_": "65536"}, steps=2, timed_steps=3)
    assert measured == {"seconds_by_step": [1.0]}
    assert seen["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert not {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE"} & set(seen["env"])
    assert seen["command"][-7:] == ["--child", "64", "plain PyTorch (selective off)", "default", "-", "2", "3"]
