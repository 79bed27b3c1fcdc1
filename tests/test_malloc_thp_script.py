"""`benchmarks/bench_malloc_thp.py`: it reads the kernel's THP mode and hands each child only its own setting."""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_malloc_thp  # noqa: E402
from bench_malloc_thp import SETTINGS, run_child, transparent_huge_pages  # noqa: E402


def test_the_thp_mode_is_the_bracketed_word(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert transparent_huge_pages(mode) == "madvise"
    mode.write_text("[always] madvise never\n")
    assert transparent_huge_pages(mode) == "always"
    assert transparent_huge_pages(tmp_path / "missing").startswith("unknown")


def test_a_child_gets_its_settings_and_no_inherited_malloc_or_thp_variable(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    seen = {}

    def fake_run(command, *, env, **kwargs):
        seen["command"], seen["env"] = command, env
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps({"seconds_by_step": [1.0]}) + "\n")

    monkeypatch.setattr(bench_malloc_thp.subprocess, "run", fake_run)
    run_child(64, "checkpointing (every level + mid + conditions)", "default", SETTINGS["fixed threshold"], 3)
    assert seen["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert not {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE"} & set(seen["env"])
    assert seen["command"][-7:] == ["--child", "64", "checkpointing (every level + mid + conditions)", "default", "-",
                                    "2", "3"]  # two steps for the peak (Adam's state included), then three timed
    run_child(64, "checkpointing (every level + mid + conditions)", "default",
              SETTINGS["fixed threshold + THP_MEM_ALLOC_ENABLE=1"], 3)
    assert seen["env"]["THP_MEM_ALLOC_ENABLE"] == "1" and seen["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
