"""`benchmarks/bench_layout.py` measures what it says: NDHWC operators and steps really run channels-last,
and the two layouts' steps compute the same thing."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_layout import CHANNELS_LAST, LAYOUTS, VARIANTS, operators, train_steps  # noqa: E402

from cpcbm_blocks.blocks.conv import memory_format_of  # noqa: E402


def _channels_last(t: torch.Tensor) -> bool:
    return memory_format_of(t) is CHANNELS_LAST


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_operator_runs_in_the_layout_it_is_listed_under(layout):
    ops = operators(32, 8, 96, LAYOUTS[layout])  # past PyTorch's slow_conv3d sizes: oneDNN keeps the layout
    for name in ("conv 3x3x3 forward", "GroupNorm forward", "SiLU", "addition"):
        assert _channels_last(ops[name]()) == (layout == "NDHWC"), name
    for name, index in (("conv 3x3x3 input gradient", 0), ("conv 3x3x3 weight gradient", 1), ("GroupNorm backward", 0)):
        assert _channels_last(ops[name]()[index]) == (layout == "NDHWC"), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_both_layouts_train_the_same_model_and_the_ndhwc_one_runs_channels_last(variant):
    steps, models = train_steps(16)
    seen = []
    hook = models["NDHWC"].get_submodule("blocks.down1_res1.conv1").register_forward_pre_hook(
        lambda module, args: seen.append(_channels_last(args[0])))
    try:
        for layout in LAYOUTS:
            steps[(layout, variant)]()
    finally:
        hook.remove()
    assert seen and all(seen)  # once, or twice where the level is checkpointed
    ncdhw, ndhwc = (dict(models[layout].named_parameters()) for layout in ("NCDHW", "NDHWC"))
    for name, parameter in ncdhw.items():
        torch.testing.assert_close(ndhwc[name].grad, parameter.grad, rtol=1e-4, atol=1e-5, msg=name)
