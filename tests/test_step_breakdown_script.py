"""`benchmarks/bench_step_breakdown.py`: every profiler event lands in the class its work belongs to."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step_breakdown import CLASSES, operator_class, profiled_step  # noqa: E402

from cpcbm_blocks import UNet3D, UNetSpec  # noqa: E402


@pytest.mark.parametrize(("name", "expected"), [
    ("aten::convolution_backward", "convolutions"),
    ("aten::mkldnn_convolution", "convolutions"),
    ("aten::_convolution", "convolutions"),  # a transposed convolution's kernel time sits here
    ("aten::_slow_conv2d_forward", "convolutions"),
    ("aten::slow_conv3d_forward", "convolutions"),
    ("aten::addmm", "matrix products"),
    ("aten::bmm", "matrix products"),
    ("aten::mm", "matrix products"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_softmax", "attention"),
    ("aten::native_group_norm", "norms"),
    ("aten::native_group_norm_backward", "norms"),
    ("aten::silu", "activations"),
    ("aten::silu_backward", "activations"),
    ("aten::copy_", "elementwise, copies, reductions"),
    ("aten::conj", "elementwise, copies, reductions"),
    ("aten::linalg_vector_norm", "elementwise, copies, reductions"),
    ("aten::sum", "elementwise, copies, reductions"),
    ("SiluBackward0", "autograd nodes and Functions"),
    ("autograd::engine::evaluate_function: ConvolutionBackward0", "autograd nodes and Functions"),
    ("_Conv3dChosenWeightGradBackward", "autograd nodes and Functions"),
])
def test_each_operator_goes_to_its_class(name, expected):
    assert operator_class(name) == expected


def test_a_profiled_unet_step_splits_into_classes_that_add_up_to_the_step():
    torch.manual_seed(0)
    model = UNet3D(UNetSpec.default())
    x, t = torch.randn(1, 1, 8, 16, 16), torch.tensor([500])

    def step():
        model.zero_grad(set_to_none=True)
        model(x, t).square().mean().backward()

    step()
    seconds = profiled_step(step)
    assert set(seconds) == {*CLASSES, "step"}
    assert all(value >= 0 for value in seconds.values())
    for work in ("convolutions", "matrix products", "attention", "norms", "activations"):
        assert seconds[work] > 0, work
    # "outside any operator" is the rest of the wall time, so the classes add up to the step
    assert sum(seconds[c] for c in CLASSES) == pytest.approx(seconds["step"], rel=0.02)
