import json

import pytest

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
    assert "checkpoint_levels=...): expected a tuple of 1-based level numbers in 1..4, got (7,)" in capsys.readouterr().err


def test_plan_without_selective_recomputation_holds_more(capsys):
    plans = {}
    for flags in ([], ["--no-selective"]):
        assert main(["plan", "--format", "json", "--input-shape", "1,1,8,32,32", *flags]) == 0
        plans[bool(flags)] = json.loads(capsys.readouterr().out)
    assert plans[False]["selective"] and not plans[True]["selective"]
    assert plans[True]["saved_bytes"] > 2 * plans[False]["saved_bytes"]


def test_plan_for_cuda_counts_cudnns_workspace_and_trains_as_a_gpu_does(capsys):
    plans = {}
    for name, argv in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", "cuda"]),
                       ("cuda selective", ["--device", "cuda", "--selective"]),
                       ("cuda not selective", ["--device", "cuda", "--no-selective"])):
        assert main(["plan", "--format", "json", *argv]) == 0  # full size: copies of 64 MiB
        plans[name] = json.loads(capsys.readouterr().out)
    assert plans["cpu"]["device"] == "cpu" and plans["cuda"]["device"] == "cuda"
    # Selective recomputation as UNet3D decides it by device: on for the CPU, off on a GPU.
    assert plans["cpu"]["selective"] and not plans["cuda"]["selective"] and plans["cuda selective"]["selective"]
    timings = ("planning_seconds", "torch_meta_import_seconds")
    same = [{k: v for k, v in plans[name].items() if k not in timings} for name in ("cuda", "cuda not selective")]
    assert same[0] == same[1]
    assert plans["cuda selective"]["saved_bytes"] == plans["cpu"]["saved_bytes"]
    peak = plans["cuda selective"]  # at the level-1 convolution's backward: 128 MiB of NDHWC copies
    assert peak["peak_scratch_bytes"] >= 128 * 2**20 and "of it cuDNN's workspace" in peak["peak_at"]
    assert main(["plan", "--input-shape", "1,1,8,64,64", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "on cuda (tensors and cuDNN's workspace; no CUDA context; no allocator cache)" in out


def test_plan_refuses_both_selective_switches(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--selective", "--no-selective"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_cpu_plan_says_what_a_process_adds_to_it_and_a_cuda_plan_does_not(capsys):
    from cpcbm_blocks.malloc import glibc
    from cpcbm_blocks.measure import rss_bytes

    assert main(["plan", "--input-shape", "1,1,8,32,32"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("on cpu"))
    held_gib = float(line.split("this one holds ")[1].split(" GiB")[0])
    assert 0.05 < held_gib <= rss_bytes() / 2**30 + 0.01  # measured in this process, just now
    assert ("return_freed_blocks()" in line) == (glibc() is not None)
    assert "read its RSS after one small step" in line  # how to measure what a training process adds
    assert main(["plan", "--input-shape", "1,1,8,32,32", "--device", "cuda"]) == 0
    assert "on cpu " not in capsys.readouterr().out
    assert main(["plan", "--input-shape", "1,1,8,32,32", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["process_rss_bytes"] > 0


def test_plan_json_has_the_embedding_and_its_totals_are_the_sums_of_the_rows(capsys):
    assert main(["plan", "--format", "json", "--spec", "conditioned", "--input-shape", "1,1,8,32,32",
                 "--text-tokens", "7"]) == 0
    report = json.loads(capsys.readouterr().out)
    for total, embedding, row in (("parameter_count", "embedding_parameters", "parameters"),
                                  ("saved_bytes", "embedding_saved_bytes", "saved_bytes"),
                                  ("forward_flops", "embedding_forward_flops", "forward_flops")):
        assert report[embedding] > 0
        assert report[total] == report[embedding] + sum(step[row] for step in report["steps"]), total
    assert main(["plan", "--spec", "conditioned", "--input-shape", "1,1,8,32,32", "--text-tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert "  0  embedding + condition encoder" in out and "\nembedding " in out


def test_plan_text_labels_the_score_matrix_apart_from_the_saved_bytes(capsys):
    assert main(["plan", "--input-shape", "1,1,8,64,64", "--attention", "naive"]) == 0
    lines = capsys.readouterr().out.splitlines()
    saved = next(line for line in lines if line.startswith("saved for backward"))
    assert "attention" not in saved
    score = next(line for line in lines if line.startswith("attention score matrix, largest:"))
    assert "naive backend materialises it" in score and "fused SDPA never does" in score
    assert "1 score mat MiB" in lines[1]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "lots"])
def test_plan_refuses_a_memory_budget_that_is_not_a_positive_finite_number(capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["plan", f"--fit-gib={value}"])
    assert exited.value.code == 2
    assert f"argument --fit-gib: expected a positive, finite number of GiB such as 24, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5", "0"])
def test_plan_refuses_a_non_positive_number_of_text_tokens(capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--spec", "conditioned", f"--text-tokens={value}"])
    assert exited.value.code == 2
    assert f"argument --text-tokens: expected a positive integer such as 77, got '{value}'" in capsys.readouterr().err


def test_plan_refuses_checkpointing_the_conditions_of_a_spec_without_conditioning(capsys):
    assert main(["plan", "--input-shape", "1,1,8,32,32", "--checkpoint-conditions"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before planning, not planned as "checkpointing conditions"
    assert ("--checkpoint-conditions: expected a spec with conditioning (such as --spec conditioned), "
            "got UNetSpec.default(), which has none") in captured.err


@pytest.mark.parametrize("device, not_counted", [
    ("cpu", "the Python/torch process itself (with what torch loads on the first step"),
    ("cuda", "the CUDA context, cuBLAS's workspaces (made by the process's first matrix product, then kept)")])
def test_the_largest_batch_line_names_the_device_and_what_is_not_counted(capsys, device, not_counted):
    assert main(["plan", "--input-shape", "1,1,8,32,32", "--device", device, "--fit-gib", "0.75"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("largest batch"))
    assert line.startswith("largest batch that fits in 0.75 GiB: ")
    assert f"(by the {device} plan's predicted peak; not counted: {not_counted}" in line


def test_a_plan_in_a_process_that_timed_no_weight_gradient_says_it_assumed_the_larger_form(capsys, monkeypatch):
    from cpcbm_blocks.blocks import conv_weight_grad

    monkeypatch.setattr(conv_weight_grad, "_weight_grad_method", "auto")
    monkeypatch.setattr(conv_weight_grad, "_fastest_form", {})  # as in a fresh `cpcbm-blocks plan`
    assert main(["plan", "--input-shape", "1,1,8,32,32"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("weight gradients"))
    assert "none timed in this process yet" in line and "depth-tap form" in line and "upper bound" in line


def test_plan_help_says_the_dtype_is_a_cast_model_and_autocast_keeps_fp32_state(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dtype of a model cast with model.to(dtype)" in text
    assert "Under torch.autocast, parameters, gradients and Adam state stay fp32" in text
