import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpcbm_blocks import UNetSpec
from cpcbm_blocks.cli import main

from .conftest import ROOT


def test_trace_with_no_arguments_checks_the_default_and_exits_zero(capsys):
    assert main(["trace"]) == 0
    out = capsys.readouterr().out
    assert "39/39 transitions agree with the plan" in out
    assert "1,8,256,256 ->(conv_in)-> 32,8,256,256" in out
    assert "output head (beyond the seed trace)" in out


def test_trace_json_reports_every_transition(capsys):
    assert main(["trace", "--format", "json", "--input-shape", "2,1,8,64,64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["input_shape"] == [2, 1, 8, 64, 64]
    assert len(report["transitions"]) == 39 and all(r["ok"] for r in report["transitions"])
    assert report["transitions"][-1]["beyond_seed"] is True


def test_trace_expect_matches_the_verbatim_seed_and_fails_on_a_tampered_copy(tmp_path, capsys):
    seed_page = ROOT / "docs" / "architecture" / "seed-trace.md"
    assert main(["trace", "--expect", str(seed_page)]) == 0
    tampered = tmp_path / "trace.md"
    tampered.write_text(seed_page.read_text().replace("->(down)-> 32,4,128,128", "->(down)-> 32,8,128,128"))
    assert main(["trace", "--expect", str(tampered)]) == 1
    assert "DIFFERS FROM" in capsys.readouterr().out


def test_trace_reads_a_spec_file_and_runs_a_real_cpu_forward(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(UNetSpec.default(channels=(8, 16), num_groups=4, head_channels=4, attention_levels=(2,),
                                     sample_size=(4, 16, 16)).to_json())
    assert main(["trace", "--spec", str(path), "--device", "cpu", "--input-shape", "1,1,4,16,16"]) == 0
    assert "on cpu" in capsys.readouterr().out


def test_bad_input_shape_exits_two_with_a_clear_message(capsys):
    assert main(["trace", "--input-shape", "1,1,10,256,256"]) == 2
    assert "expected depth to be a multiple of 8" in capsys.readouterr().err


def test_a_device_torch_does_not_know_or_this_machine_lacks_is_an_argument_error(capsys):
    for device, expected in (("gpu", "expected 'meta', 'cpu' or 'cuda[:N]', got 'gpu'"),
                             ("tpu", "expected 'meta', 'cpu' or 'cuda[:N]', got 'tpu'")):
        with pytest.raises(SystemExit) as raised:
            main(["trace", "--device", device])
        assert raised.value.code == 2 and f"argument --device: {expected}" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["trace", "--device", "cuda"])
        assert "torch sees no CUDA device here. Use 'meta' (shapes only) or 'cpu'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["trace", "plan"])
def test_a_misspelled_preset_or_a_directory_names_the_presets(command, tmp_path, capsys):
    for spec, problem in (("defualt", "neither a preset nor an existing file"), (str(tmp_path), "a directory")):
        assert main([command, "--spec", spec]) == 2
        assert (f"--spec: expected default or conditioned or a JSON file written by UNetSpec.to_json(), got "
                f"{spec!r}, {problem}") in capsys.readouterr().err


def test_the_module_and_console_entry_points_run():
    console_script = Path(sys.executable).parent / "cpcbm-blocks"
    assert console_script.exists(), "install the package (pip install -e .) to get the cpcbm-blocks script"
    for command in ([sys.executable, "-m", "cpcbm_blocks", "trace"], [str(console_script), "trace", "--format", "json"]):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr


def test_trace_of_the_conditioned_preset_adds_only_fusion_steps_to_the_seed(capsys):
    seed_page = ROOT / "docs" / "architecture" / "seed-trace.md"
    assert main(["trace", "--spec", "conditioned", "--expect", str(seed_page), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documented"]["ok"] and len(report["transitions"]) == 49
    assert sum(r["op"].startswith("fuse_") for r in report["transitions"]) == 10
