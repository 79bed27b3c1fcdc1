"""`benchmarks/bench_memory.py`: its child reports what the tables need, and the trade-off table's ratios are right."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import (  # noqa: E402
    FIXED_THRESHOLD,
    MALLOC_SETTINGS,
    PEAK_HEADERS,
    TIMING_SETTING,
    child,
    peak_row,
    step_seconds,
    tradeoff_table,
)
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
    child(32, "selective recomputation (default)", "default", "-", 2, 3, 0)
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(measured["peak_rss_by_step"]) == 2 and len(measured["seconds_by_step"]) == 3
    assert all(seconds > 0 for seconds in measured["seconds_by_step"])
    assert measured["planned_peak"] > 0 and measured["peak_rss"] >= measured["baseline_rss"] > 0
    assert measured["warmed_rss"] is None
    assert len(measured["huge_pages_by_step"]) == 2
    file_backed = measured["file_backed_rss"]  # libraries' pages: part of the RSS, and some of them at least
    assert sorted(file_backed) == ["after_steps", "baseline"]
    assert 0 < file_backed["baseline"] < measured["baseline_rss"] and 0 < file_backed["after_steps"] < measured["peak_rss"]


def test_warm_up_loads_what_the_first_step_loads_and_leaves_nothing_of_its_model():
    import bench_memory

    measured = bench_memory.run_child(32, "checkpointing (every level + mid + conditions)", "default",
                                      environment={"MALLOC_MMAP_THRESHOLD_": "65536"}, steps=1, timed_steps=0,
                                      warmup_size=32)
    # A fresh process: the warm-up's first checkpoint imports torch._dynamo, sympy and the rest
    # (tens of MiB), and its convolutions fault in libtorch's code.
    assert measured["warmed_rss"] - measured["baseline_rss"] > 32 * 2**20
    # The throwaway model, its gradients and Adam's state are gone: had they stayed, the RSS above
    # the warmed-up baseline would be far below the plan, whose peak at 32x32 is mostly those.
    assert 0.8 < (measured["peak_rss"] - measured["warmed_rss"]) / measured["planned_peak"] < 1.2
    # Part of what the warm-up adds is libtorch's code, faulted in by the kernels it runs.
    assert measured["file_backed_rss"]["warmed"] > measured["file_backed_rss"]["baseline"]


def test_peak_row_divides_the_rss_above_each_baseline_by_the_plan():
    gib = 2**30
    measured = {"peak_rss": 3 * gib, "baseline_rss": gib // 4, "warmed_rss": gib // 2, "planned_peak": 2.5 * gib,
                "malloc_peak_step": 2.55 * gib, "peak_rss_by_step": [2.9 * gib, 3 * gib],
                "file_backed_rss": {"baseline": 0.07 * gib, "warmed": 0.15 * gib, "after_steps": 0.16 * gib}}
    row = dict(zip(PEAK_HEADERS, _rows(table_of(peak_row("default", FIXED_THRESHOLD, "plain", measured)))[0]))
    assert row["spec"] == "UNetSpec.default()" and row["peak RSS after each step GiB"] == "2.90 / 3.00"
    assert row["RSS torch imported / warmed up GiB"] == "0.25 / 0.50"
    assert row["(RSS - warmed up) / planned"] == "1" and row["(RSS - torch imported) / planned"] == "1.1"
    assert row["malloc peak / planned"] == "1.02"
    assert row["of which file-backed GiB (imported / warmed up / after the steps)"] == "0.07 / 0.15 / 0.16"
    without = dict(zip(PEAK_HEADERS, peak_row("default", FIXED_THRESHOLD, "plain", {**measured, "warmed_rss": None})))
    assert without["(RSS - warmed up) / planned"] == "-" and without["RSS torch imported / warmed up GiB"] == "0.25 / -"
    # a child of a run before the file-backed part was read
    older = {key: value for key, value in measured.items() if key != "file_backed_rss"}
    assert dict(zip(PEAK_HEADERS, peak_row("default", FIXED_THRESHOLD, "plain", older)))[
        "of which file-backed GiB (imported / warmed up / after the steps)"] == "- / - / -"


def table_of(row):
    from common import table
    return table(PEAK_HEADERS, [row])


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
    assert seen["command"][-8:] == ["--child", "64", "plain PyTorch (selective off)", "default", "-", "2", "3", "0"]
