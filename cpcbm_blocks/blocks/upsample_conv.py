"""`upsample_conv3d`: nearest upsampling followed by a convolution, computed at the low resolution.

After nearest-neighbour upsampling by 2 along an axis, output `2i + p` of a 3-tap convolution only
ever sees the low-resolution neighbours `i - 1, i` (parity `p = 0`, weights `w_0, w_1 + w_2`) or
`i, i + 1` (`p = 1`, weights `w_0 + w_1, w_2`). One convolution of the low-resolution input with
the 2-tap kernels of every parity stacked as output channels, then interleaving the parities, is
the same function with 8/27 of the multiply-adds for a `(2, 2, 2)` stride, and the upsampled input
never exists. [`Upsample3D`][cpcbm_blocks.blocks.sampling.Upsample3D] runs this way.

The interleaving is one strided copy, and its backward one zero-filled gradient and one strided
copy (`benchmarks/bench_upsample.py`); slicing the parities out instead would have autograd
zero-fill a gradient of the whole convolution output once per parity and add them up. Traced and
compiled code slice (`interleave_parities_by_slices`): their graphs have no strides to view, and a
compiler fuses the slices anyway.
"""

import itertools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from cpcbm_blocks.blocks.conv import conv3d, memory_format_of
from cpcbm_blocks.rematerialize import recomputable

__all__ = ["interleave_parities_by_slices", "upsample_conv3d"]


def upsample_conv3d(x: Float[Tensor, "b c_in d h w"], weight: Float[Tensor, "c_out c_in kd kh kw"],
                    bias: Tensor | None = None, *, scale: tuple[int, int, int]) -> Tensor:
    """`conv3d(F.interpolate(x, scale_factor=scale, mode="nearest"), weight, bias)`, computed at low resolution.

    Exact for scale factors 1 or 2 with a 1- or 3-tap kernel along each upsampled axis (see the
    module docs); any other combination upsamples first.
    """
    scale = tuple(int(f) for f in scale)
    taps = weight.shape[2:]
    if any(f not in (1, 2) or (f == 2 and k not in (1, 3)) for f, k in zip(scale, taps)):
        return conv3d(F.interpolate(x, scale_factor=scale, mode="nearest"), weight, bias)
    kernels = recomputable(_parity_kernels, weight, scale=scale)  # parities (p_d, p_h, p_w) depth-major
    z = conv3d(x, kernels, None if bias is None else bias.repeat(math.prod(scale)))
    # A 2-tap kernel pads by 1 on both sides: parity p's outputs start at index p along that axis.
    shifts = tuple(f == 2 and k == 3 for f, k in zip(scale, taps))
    # Traced sizes have no strides; a compiled graph fuses the slices on its own.
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling():
        return interleave_parities_by_slices(z, weight.shape[0], tuple(x.shape[2:]), scale, shifts)
    return _InterleaveParities.apply(z, weight.shape[0], tuple(x.shape[2:]), scale, shifts)


def interleave_parities_by_slices(z: Tensor, channels: int, size: tuple[int, int, int], scale: tuple[int, int, int],
                                  shifts: tuple[bool, bool, bool]) -> Tensor:
    """The upsampled volume from `upsample_conv3d`'s parity outputs `z`, by slicing each parity out and
    stacking: what traced and compiled code runs. In eager autograd each slice's backward zero-fills a
    gradient of the whole of `z`, so eager code runs `_InterleaveParities` (the same values)."""
    parts = []
    for index, parity in enumerate(itertools.product(*(range(f) for f in scale))):
        od, oh, ow = (p if shift else 0 for shift, p in zip(shifts, parity))
        parts.append(z[:, index * channels:(index + 1) * channels, od:od + size[0], oh:oh + size[1], ow:ow + size[2]])
    y = torch.stack(parts, dim=2).unflatten(2, scale)  # b c pd ph pw d h w
    return rearrange(y, "b c pd ph pw d h w -> b c (d pd) (h ph) (w pw)")


def _parity_view(z: Tensor, channels: int, size: tuple[int, int, int], scale: tuple[int, int, int],
                 shifts: tuple[bool, bool, bool]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sizes and strides of the `(b, c, d, pd, h, ph, w, pw)` view of `z` that reads parity `p`'s outputs.

    Parity `(pd, ph, pw)` is channel block `(pd * P_h + ph) * P_w + pw` of `z`, and along a shifted
    axis its output `i` sits at index `i + p`: so one step of `pd` moves by that block's channel
    stride plus (when shifted) one depth step, and likewise for `ph` and `pw`.
    """
    s_b, s_c, s_d, s_h, s_w = z.stride()
    block = channels * s_c
    parity_strides = (scale[1] * scale[2] * block + shifts[0] * s_d, scale[2] * block + shifts[1] * s_h,
                      block + shifts[2] * s_w)
    sizes = (z.shape[0], channels, size[0], scale[0], size[1], scale[1], size[2], scale[2])
    strides = (s_b, s_c, s_d, parity_strides[0], s_h, parity_strides[1], s_w, parity_strides[2])
    return sizes, strides


class _InterleaveParities(torch.autograd.Function):
    """The parity outputs of `upsample_conv3d`'s convolution `z`, interleaved into the upsampled volume.

    One strided view of `z` and one copy; backward is one zero-filled gradient of `z` and one strided
    copy into it. Slicing the parities out of `z` instead makes autograd zero-fill a gradient of the
    whole of `z` once per parity (eight times for a `(2, 2, 2)` stride) and add the eight together.
    """

    @staticmethod
    def forward(z, channels, size, scale, shifts):
        sizes, strides = _parity_view(z, channels, size, scale, shifts)
        upsampled = [n * f for n, f in zip(size, scale)]
        out = z.as_strided(sizes, strides, z.storage_offset()).reshape(z.shape[0], channels, *upsampled)
        return out.contiguous(memory_format=memory_format_of(z))

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, channels, size, scale, shifts = inputs
        ctx.z_shape, ctx.z_stride, ctx.parity = tuple(z.shape), z.stride(), (channels, size, scale, shifts)

    @staticmethod
    def backward(ctx, grad):
        grad_z = torch.empty_strided(ctx.z_shape, ctx.z_stride, dtype=grad.dtype, device=grad.device).zero_()
        sizes, strides = _parity_view(grad_z, *ctx.parity)
        grad_z.as_strided(sizes, strides, 0).copy_(grad.reshape(sizes))  # (d pd) -> d pd, and so on
        return grad_z, None, None, None, None


def _parity_kernels(weight: Tensor, *, scale: tuple[int, int, int]) -> Tensor:
    """The kernels of every parity of `upsample_conv3d`, stacked as output channels (depth-major).

    Along an axis upsampled by 2 with 3 taps `(w0, w1, w2)`, an output at an even position (parity 0)
    reads its low-resolution neighbour once and itself twice: taps `(w0, w1 + w2)`; an odd one reads
    itself twice and the next neighbour once: `(w0 + w1, w2)`. Both parities of an axis are built at
    once and stacked in front, width first, so that depth's parity ends outermost and the result is
    already in output-channel order: a dozen operators and no transposing copy, not a loop over the
    eight parities. Sums, not a matrix product, so any dtype (and autocast) gives exactly the folded
    weights.
    """
    kernel = weight
    for dim in (4, 3, 2):  # w, h, d: each stack adds a leading parity axis, so d's ends outermost
        factor, taps = scale[dim - 2], weight.shape[dim]
        dim += kernel.dim() - weight.dim()  # past the parity axes already in front
        if factor == 2 and taps == 3:
            first, middle, last = kernel.split(1, dim)
            kernel = torch.stack([torch.cat([first, middle + last], dim), torch.cat([first + middle, last], dim)])
        elif factor == 2:  # a 1-tap axis: both parities read the same input
            kernel = torch.stack([kernel, kernel])
    return kernel.reshape(-1, *weight.shape[1:2], *kernel.shape[-3:])
