"""`conv3d_by_taps`: a convolution to a few output channels as one matrix product and a sum of shifted slices.

A `k_d x k_h x k_w` convolution with "same" padding and stride 1 writes, at every voxel `p`,
`out[o, p] = sum over taps t of (W[o, :, t] . x[:, p + t - k // 2])`. Computing every product
`z[o, t, q] = W[o, :, t] . x[:, q]` first is one matrix product over channels, `(C_out * taps, C_in)`
by `(C_in, voxels)`, with exactly the convolution's multiply-adds; the output is then the sum over
taps of `z[o, t]` shifted by the tap's offset, where the shift drops what would fall into the zero
padding. Backward is the same in reverse: the gradient of `z[o, t]` is the output gradient shifted
back (zero where the tap met padding), and the gradients of `x` and `W` are two more matrix products.

Why: oneDNN pads output channels to its channel block (8 or 16), so a convolution to one channel, the
output head of every UNet here, costs as much as one to 16, and runs at a small fraction of the
FLOP/s of the 32-channel convolutions beside it. `benchmarks/bench_conv_by_taps.py` measures both
forms, to 1, 2 and 3 channels (its table is on the performance page). The price is `z`:
`C_out * taps` channels at the input's resolution (27 for the head), which is why `Conv3d` takes
this form only while `z` has at most twice the input's channels (`by_taps_pays`), and only on CPU:
cuDNN has no such penalty.
"""

import itertools
import math

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from cpcbm_blocks.errors import InputError

__all__ = ["MAX_TAP_CHANNELS_PER_INPUT_CHANNEL", "by_taps_pays", "conv3d_by_taps"]

MAX_TAP_CHANNELS_PER_INPUT_CHANNEL = 2
"""`by_taps_pays` takes the taps form while `C_out * taps <= this * C_in`, so the products `z` hold at
most this many times the input. Where the gain ends was measured by `benchmarks/bench_conv_by_taps.py`
(its tables are on the performance page), with a 3x3x3 kernel, forward and backward: from 32
channels at 256x256 the taps form wins clearly for 1 and 2 output channels and narrowly for 3 (81
tap channels, `z` more than twice the input); from 128 channels at 64x64 it wins for 4 output
channels and barely for 8, at the threshold."""


def by_taps_pays(x: Tensor, weight: Tensor, *, stride: tuple[int, ...], groups: int) -> bool:
    """True where `conv3d_by_taps` computes `conv3d(x, weight)` and is the faster form: plain-layout
    input, stride 1, ungrouped, an odd kernel with more than one tap, and few output channels."""
    taps = math.prod(weight.shape[2:])
    return (x.is_contiguous() and groups == 1 and all(s == 1 for s in stride) and taps > 1
            and all(k % 2 for k in weight.shape[2:])
            and weight.shape[0] * taps <= MAX_TAP_CHANNELS_PER_INPUT_CHANNEL * weight.shape[1])


def conv3d_by_taps(x: Float[Tensor, "b c_in d h w"], weight: Float[Tensor, "c_out c_in kd kh kw"],
                   bias: Float[Tensor, " c_out"] | None = None) -> Float[Tensor, "b c_out d h w"]:
    """`F.conv3d(x, weight, bias, padding=k // 2)` (odd kernel, stride 1) by one matrix product over channels
    and a sum of shifted slices (see the module docs); gradients by two more matrix products."""
    if x.dim() != 5 or weight.dim() != 5 or weight.shape[1] != x.shape[1]:
        raise InputError(f"x, weight: expected x (b, c_in, d, h, w) and weight (c_out, c_in, kd, kh, kw) with the same "
                         f"c_in, got {tuple(x.shape)} and {tuple(weight.shape)}. Pass an ungrouped 3-D kernel.")
    if not all(k % 2 for k in weight.shape[2:]):
        raise InputError(f"weight: expected an odd kernel size along every axis (\"same\" padding k // 2), got "
                         f"{tuple(weight.shape[2:])}. Use F.conv3d for even kernels.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputError(f"bias: expected shape ({weight.shape[0]},), one value per output channel, got "
                         f"{tuple(bias.shape)}. Pass weight.shape[0] values or None.")
    return _ConvByTaps.apply(x, weight, bias)


def _shifted_slices(kernel: tuple[int, ...], size: tuple[int, ...]):
    """Per tap: the tap, the output slices it adds to, and the slices of `z` it reads there.

    Along an axis of length `n`, tap `t` of a `k`-tap kernel reads input `i + t - k // 2` for output `i`;
    only the outputs whose input lies inside `[0, n)` receive anything (the rest met zero padding).
    """
    for tap in itertools.product(*map(range, kernel)):
        outputs, inputs = [], []
        for n, t, k in zip(size, tap, kernel):
            offset = t - k // 2
            first, stop = max(0, -offset), min(n, n - offset)
            outputs.append(slice(first, stop))
            inputs.append(slice(first + offset, stop + offset))
        yield tap, tuple(outputs), tuple(inputs)


def _tap_matrix(weight: Tensor) -> Tensor:
    return rearrange(weight, "o i kd kh kw -> (o kd kh kw) i")


class _ConvByTaps(torch.autograd.Function):
    """`conv3d_by_taps`. Saves `x` and `weight`, as a convolution does; `z` and its gradient are transients."""

    @staticmethod
    def forward(x, weight, bias):
        batch, channels, *size = x.shape
        out_channels, _, *kernel = weight.shape
        taps = _tap_matrix(weight)
        z = x.new_empty(batch, taps.shape[0], math.prod(size))
        for i in range(batch):  # one 2-D product per sample: batch-1 bmm ran at half mm's speed here
            torch.mm(taps, x[i].view(channels, -1), out=z[i])
        z = z.view(batch, out_channels, *kernel, *size)
        if bias is None:
            out = x.new_zeros(batch, out_channels, *size)
        else:
            out = bias.view(1, out_channels, 1, 1, 1).expand(batch, out_channels, *size).contiguous()
        for tap, outputs, inputs in _shifted_slices(tuple(kernel), tuple(size)):
            out[(..., *outputs)].add_(z[(slice(None), slice(None), *tap, *inputs)])
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        batch, channels, *size = x.shape
        out_channels, _, *kernel = weight.shape
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        grad_z = grad_out.new_zeros(batch, out_channels, *kernel, *size)
        for tap, outputs, inputs in _shifted_slices(tuple(kernel), tuple(size)):
            grad_z[(slice(None), slice(None), *tap, *inputs)] = grad_out[(..., *outputs)]
        grad_z = grad_z.view(batch, out_channels * math.prod(kernel), math.prod(size))
        taps = _tap_matrix(weight)
        if need_x:
            grad_x = x.new_empty(x.shape)
            for i in range(batch):
                torch.mm(taps.t(), grad_z[i], out=grad_x[i].view(channels, -1))
        if need_weight:
            grad_taps = taps.new_zeros(taps.shape)
            for i in range(batch):  # addmm, not addmm_: FlopCounterMode (and so the planner) counts only the former
                grad_taps = torch.addmm(grad_taps, grad_z[i], x[i].view(channels, -1).t())
            grad_weight = rearrange(grad_taps, "(o kd kh kw) i -> o i kd kh kw", o=out_channels, kd=kernel[0],
                                    kh=kernel[1], kw=kernel[2])
        if need_bias:
            grad_bias = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias
