"""`upsample_conv3d`: the sub-pixel form equals nearest upsampling then a convolution, at a fraction of the cost."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cpcbm_blocks.blocks.upsample_conv import upsample_conv3d


@given(batch=st.integers(1, 2), depth=st.integers(1, 4), size=st.integers(1, 5),
       scale=st.sampled_from([(2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1), (1, 1, 1)]),
       taps=st.sampled_from([(3, 3, 3), (1, 3, 3), (3, 1, 3), (1, 1, 1)]), bias=st.booleans())
def test_the_sub_pixel_upsample_convolution_equals_upsampling_then_convolving(batch, depth, size, scale, taps, bias):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, depth, size, size + 1, requires_grad=True)
    weight = torch.randn(5, 3, *taps, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if bias else None
    ours = upsample_conv3d(x, weight, b, scale=scale)
    padding = tuple(k // 2 for k in taps)
    reference = F.conv3d(F.interpolate(x, scale_factor=scale, mode="nearest"), weight, b, padding=padding)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(reference)
    inputs = (x, weight) if b is None else (x, weight, b)
    for a, r in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()))


def test_the_sub_pixel_form_runs_the_convolution_at_low_resolution_and_keeps_autocast_dtypes():
    x, weight = torch.randn(1, 4, 2, 6, 6), torch.randn(4, 4, 3, 3, 3)
    with FlopCounterMode(display=False) as sub_pixel:
        upsample_conv3d(x, weight, scale=(2, 2, 2))
    with FlopCounterMode(display=False) as upsampled:
        F.conv3d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    assert upsampled.get_total_flops() == 2 * 4 * 4 * 27 * (4 * 12 * 12)
    # 8 parities x 2x2x2 taps, each over the low-resolution volume padded by one: (2+1) x (6+1) x (6+1) outputs.
    assert sub_pixel.get_total_flops() == 2 * 4 * 4 * 8 * 8 * (3 * 7 * 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_conv3d(x, weight, torch.zeros(4), scale=(2, 2, 2))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 4, 12, 12)
    # A scale the parity form does not cover upsamples first and stays exact.
    odd = upsample_conv3d(x, weight, scale=(1, 3, 3))
    torch.testing.assert_close(odd, F.conv3d(F.interpolate(x, scale_factor=(1, 3, 3), mode="nearest"), weight,
                                             padding=1), rtol=1e-4, atol=1e-4)


class _FullSizeZeroFills(TorchDispatchMode):
    """Counts operators that zero-fill a tensor of `shape` (`slice_backward` makes a zero-filled one too)."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        zeroing = func in (torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.zeros.default,
                           torch.ops.aten.new_zeros.default, torch.ops.aten.slice_backward.default)
        self.count += zeroing and tuple(out.shape) == self.shape
        return out


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_the_parities_are_interleaved_by_one_strided_copy_each_way(memory_format):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 5, 6).to(memory_format=memory_format).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    out = upsample_conv3d(x, weight, scale=(2, 2, 2))
    assert type(out.grad_fn).__name__ == "_InterleaveParitiesBackward"
    assert out.is_contiguous(memory_format=memory_format)  # the input's layout
    reference = F.conv3d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(reference).transpose(3, 4).contiguous().transpose(3, 4)  # not contiguous
    with _FullSizeZeroFills((2, 8 * 4, 4, 6, 7)) as fills:  # z: 8 parities x 4 channels, each axis one longer
        ours = torch.autograd.grad(out, (x, weight), grad)
    assert fills.count == 1  # slicing eight parities out would zero-fill z eight times
    for a, r in zip(ours, torch.autograd.grad(reference, (x, weight), grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()))
