"""The GPU benchmark cannot run here; its CPU smoke mode keeps the script from rotting until one does."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpcbm_blocks import UNetSpec
from cpcbm_blocks.memory import memory_plan

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_step.py"


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_gpu_step
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_gpu_step


def test_the_gpu_step_benchmark_runs_every_variant_in_its_cpu_smoke_mode():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "16", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "median s" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    expected = [name for name, variant in _bench().VARIANTS.items()
                if variant.network != "MONAI" or importlib.util.find_spec("monai") is not None]
    assert names == expected and "default, bf16 autocast" in names and "default, fp32, selective=True" in names
    assert "(a smoke run on the CPU: not saved)" in done.stdout


def test_a_saved_gpu_result_is_planned_again_with_the_current_planner(tmp_path):
    result = json.loads((SCRIPT.parent / "results" / "gpu_step.json").read_text())
    rows = [row for row in result["data"]["rows"] if row["variant"] in ("default, fp32", "MONAI, fp32")]
    assert len(rows) == 2
    measured = [(row["seconds"], row["peak_bytes"]) for row in rows]
    for row in rows:
        row["planned_bytes"] = 1  # whatever a planner of the past said
    result["data"]["rows"] = rows
    path = tmp_path / "gpu_step.json"
    path.write_text(json.dumps(result))
    done = subprocess.run([sys.executable, str(SCRIPT), "--replan", str(path)], capture_output=True, text=True,
                          timeout=300, cwd=SCRIPT.parent, check=False)
    assert done.returncode == 0, done.stderr
    replanned = json.loads(path.read_text())
    ours, monai = replanned["data"]["rows"]
    assert [(row["seconds"], row["peak_bytes"]) for row in (ours, monai)] == measured  # the GPU's, untouched
    assert ours["planned_bytes"] == memory_plan(UNetSpec.default(), (1, 1, 8, 256, 256), device="cuda",
                                                selective=False).peak_bytes
    assert monai["planned_bytes"] is None and "replanned_utc" in replanned["data"]
    assert "| default, fp32 " in replanned["tables"]["gpu_step"]


def test_the_allocator_replay_finds_the_most_allocated_at_once_and_what_was_live():
    before = {0: {"size": 100}}
    trace = [{"action": "alloc", "addr": 1, "size": 50}, {"action": "alloc", "addr": 2, "size": 30},
             {"action": "free_requested", "addr": 1, "size": 50}, {"action": "free_completed", "addr": 1, "size": 50},
             {"action": "free_requested", "addr": 0, "size": 100},  # a block from before the step goes
             {"action": "alloc", "addr": 3, "size": 60}, {"action": "segment_alloc", "addr": 9, "size": 999}]
    peak, live = _bench().replay_to_peak(before, trace)
    assert peak == 180 and sorted(live) == [0, 1, 2]  # not 30 + 60 later: the block from before was freed


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the script runs for real")
def test_the_gpu_step_benchmark_says_what_to_do_without_a_cuda_device():
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "16", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300, cwd=SCRIPT.parent, check=False)
    assert done.returncode != 0 and "pass --device cpu --size 64 for a smoke run" in done.stderr


def test_the_planner_predicts_the_last_gpu_runs_measured_peaks_within_5_percent():
    """The GPU's own figures, kept in `results/gpu_step.json`, hold the planner to them in every CI run:
    each float32 and bf16 row's `max_memory_allocated` (the step's own allocations) against a plan made
    now. Autocast rows have no plan of their own (the planner does not model autocast), channels-last
    rows and MONAI's none at all."""
    bench = _bench()
    result = json.loads((SCRIPT.parent / "results" / "gpu_step.json").read_text())
    shape = tuple(result["data"]["shape"])
    rows = [row for row in result["data"]["rows"]
            if row["network"] != "MONAI" and row["precision"] in ("fp32", "bf16") and not row["channels_last"]]
    assert {row["precision"] for row in rows} == {"fp32", "bf16"} and len(rows) >= 4
    for row in rows:
        planned = bench.Variant.from_dict(row).planned_bytes(shape)
        assert row["peak_bytes"] == pytest.approx(planned, rel=0.05), row["variant"]
