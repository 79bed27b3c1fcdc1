"""The performance page's depth-padding table counts what `Conv3d` really computes.

`docs/hooks/generate.py` builds the table from `depth_pairs`, which says how many (output slice,
depth tap) pairs' worth of multiply-accumulates a convolution runs; here that is held to
`FlopCounterMode` over real calls (on `meta`, where `Conv3d` takes its device-independent forms:
depth folded into channels where the volume is no deeper than the kernel, else one 3-D kernel).
"""

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cpcbm_blocks import Conv3d

from ..conftest import ROOT

_spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "hooks" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


@pytest.mark.parametrize(("depth", "stride"), [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2)])
def test_depth_pairs_count_the_multiply_accumulates_conv3d_runs(depth, stride):
    conv = Conv3d(4, 6, kernel_size=(3, 3, 3), stride=(stride, 1, 1), bias=False).to("meta")
    x = torch.empty(1, 4, depth, 8, 8, device="meta")
    with FlopCounterMode(display=False) as counter:
        y = conv(x)
    pairs, padded, computed = generate.depth_pairs(conv, depth, y.shape[2])
    per_pair = 8 * 8 * 6 * 4 * 3 * 3  # H x W x C_out x C_in x kh x kw
    assert counter.get_total_flops() == 2 * per_pair * computed
    assert pairs == y.shape[2] * 3 and 0 <= padded < pairs
    if conv.folds(depth) and depth <= 2:  # folded at 2 slices: every (out, in) block is a real tap
        assert computed == pairs - padded


def test_the_table_names_what_is_left():
    table = generate._depth_padding()
    rows = [line for line in table.splitlines() if line.startswith("| 2 | 3x3x3 | 1x1x1 ")]
    assert rows and rows[0].endswith("| 0.00 G |"), "the 2-slice level folds depth: it computes no padding"
    assert table.splitlines()[-1].startswith("| all |")
