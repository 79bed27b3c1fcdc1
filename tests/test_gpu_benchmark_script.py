"""The GPU benchmark cannot run here; its CPU smoke mode keeps the script from rotting until one does."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_step.py"


def test_the_gpu_step_benchmark_runs_every_variant_in_its_cpu_smoke_mode():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "16", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "median s" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["bf16 autocast", "bf16", "fp32"]
    assert "(a smoke run on the CPU: not saved)" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the script runs for real")
def test_the_gpu_step_benchmark_says_what_to_do_without_a_cuda_device():
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "16", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300, cwd=SCRIPT.parent, check=False)
    assert done.returncode != 0 and "pass --device cpu --size 64 for a smoke run" in done.stderr
