import json

from cpcbm_blocks.cli import main


def test_plan_with_no_arguments_plans_the_default_at_full_size(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 1, 8, 256, 256), fp32 on cpu, attention sdpa, checkpointing off" in out
    assert "dominant level: level 1" in out and "predicted peak" in out
    assert " 39  output head (beyond the seed trace)" in out


def test_plan_json_with_checkpointing_naive_attention_and_a_memory_budget(capsys):
    argv = ["plan", "--format", "json", "--input-shape", "1,1,8,128,128", "--checkpoint-levels", "1,2",
            "--checkpoint-mid", "--attention", "naive", "--dtype", "bf16", "--fit-gib", "0.5"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint_levels"] == [1, 2] and report["checkpoint_mid"] and report["dtype"] == "bf16"
    assert report["attention_score_bytes"] > 0 and report["largest_batch"] >= 1
    assert len(report["steps"]) == 39 and report["steps"][1]["checkpointed"]


def test_plan_rejects_a_level_that_does_not_exist(capsys):
    assert main(["plan", "--checkpoint-levels", "7"]) == 2
    assert "checkpoint_levels: expected level numbers in 1..4" in capsys.readouterr().err


def test_plan_without_selective_recomputation_holds_more(capsys):
    plans = {}
    for flags in ([], ["--no-selective"]):
        assert main(["plan", "--format", "json", "--input-shape", "1,1,8,32,32", *flags]) == 0
        plans[bool(flags)] = json.loads(capsys.readouterr().out)
    assert plans[False]["selective"] and not plans[True]["selective"]
    assert plans[True]["saved_bytes"] > 2 * plans[False]["saved_bytes"]


def test_plan_for_cuda_leaves_out_onednns_copies_and_says_so(capsys):
    plans = {}
    for device in ("cpu", "cuda"):
        assert main(["plan", "--format", "json", "--device", device]) == 0  # full size: copies of 64 MiB
        plans[device] = json.loads(capsys.readouterr().out)
    assert plans["cpu"]["device"] == "cpu" and plans["cuda"]["device"] == "cuda"
    assert plans["cuda"]["peak_bytes"] < plans["cpu"]["peak_bytes"]  # the copies only add to the peak
    assert plans["cuda"]["saved_bytes"] == plans["cpu"]["saved_bytes"]
    assert main(["plan", "--input-shape", "1,1,8,64,64", "--device", "cuda"]) == 0
    assert "on cuda (tensors only: no cuDNN workspaces or CUDA context; no allocator cache)" in capsys.readouterr().out


def test_a_cpu_plan_says_what_a_process_adds_to_it_and_a_cuda_plan_does_not(capsys):
    from cpcbm_blocks.malloc import glibc
    from cpcbm_blocks.measure import rss_bytes

    assert main(["plan", "--input-shape", "1,1,8,32,32"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("on cpu"))
    held_gib = float(line.split("this one holds ")[1].split(" GiB")[0])
    assert 0.05 < held_gib <= rss_bytes() / 2**30 + 0.01  # measured in this process, just now
    assert ("return_freed_blocks()" in line) == (glibc() is not None)
    assert main(["plan", "--input-shape", "1,1,8,32,32", "--device", "cuda"]) == 0
    assert "on cpu " not in capsys.readouterr().out
    assert main(["plan", "--input-shape", "1,1,8,32,32", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["process_rss_bytes"] > 0
