"""The weight gradient of a convolution on CPU: oneDNN's 3-D kernel, 2-D kernels over depth taps, or a
matrix product, whichever this machine runs fastest.

**Depth taps.** Tap `a` of the kernel's depth axis only ever pairs output slice `o` with input
slice `o*s_d + a - p_d`, so its gradient is a 2-D weight gradient over the batch of matching
`(output, input)` slice pairs; the kernel's `k_d` taps are `k_d` such 2-D gradients
(`weight_grad_by_depth_taps`). A `1x1x1` kernel's gradient is also `grad_out @ x^T` over the voxels.

**Measured, once per problem.** Which form is faster depends on the CPU
(`benchmarks/bench_conv_backward.py`): on an AVX2 machine oneDNN's 3-D weight gradient ran at about
40 GFLOP/s and the taps twice as fast; on an AVX-512 one the 3-D form ran at about 190-210 GFLOP/s,
7-32% faster than the taps over two sessions' runs. So by default (`set_weight_grad_method("auto")`)
the first backward of each problem (shapes, strides, dtype, thread count) times every form that
applies once and keeps the fastest, as `torch.backends.cudnn.benchmark` does on GPUs.

**Under gradient checkpointing, a large weight gradient by halves.** oneDNN's 3-D weight gradient
works on channel-blocked copies of its input and of the output gradient, both at once: 128 MiB
at the full-size level 1, on top of everything live at that moment of backward, which is where
a checkpointed step peaks. There (inside `rematerialized_saves(products=True)`), an output
gradient, then an input, of `WEIGHT_GRAD_HALVES_MIN_BYTES` or more (one sample, so that each half
is contiguous) is split in halves of its channels, one call each: 64 MiB of copies at a time.
Measured at `(1, 32, 8, 256, 256)`: 15% more time on that operator for the output halves, 30%
with both; without checkpointing, where time comes first, the whole gradient runs at once.
"""

import time
from functools import partial
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from cpcbm_blocks.blocks.conv_onednn import cpu_kernels, depth_last_reaches_onednn, pointwise
from cpcbm_blocks.errors import InputError

__all__ = ["WEIGHT_GRAD_HALVES_MIN_BYTES", "WEIGHT_GRAD_METHODS", "set_weight_grad_method", "weight_grad_by_depth_taps",
           "weight_grad_method"]


WEIGHT_GRAD_METHODS = ("auto", "depth_taps", "aten")
"""How `Conv3d` computes a 3-D weight gradient on CPU: `"auto"` (time every form that applies once per
problem, keep the fastest; the default), `"depth_taps"` (`weight_grad_by_depth_taps`) or `"aten"`
(oneDNN's 3-D kernel)."""

_weight_grad_method = "auto"
_fastest_form: dict[tuple, str] = {}  # per problem, the form "auto" measured fastest


def weight_grad_method() -> str:
    """The method `set_weight_grad_method` chose (`"auto"` unless it was called)."""
    return _weight_grad_method


def timed_problem_count() -> int:
    """How many weight-gradient problems `"auto"` has timed in this process (each keeps its fastest form)."""
    return len(_fastest_form)


def set_weight_grad_method(method: str) -> None:
    """Choose how 3-D weight gradients are computed on CPU: one of `WEIGHT_GRAD_METHODS`.

    `"auto"` (the default) times the depth-tap form against oneDNN's 3-D kernel (and, for a `1x1x1`
    kernel, a matrix product) on the first backward of each problem (shapes, strides, dtype, torch
    thread count) and keeps the fastest: the forms sum in different orders, so which one runs can
    change the last bits of a gradient from one machine to another. Pin `"aten"` or `"depth_taps"`
    for bit-for-bit repeatable runs across machines. On the `meta` device (the memory planner)
    `"auto"` plans the form this process measured fastest for the same problem, and the depth-tap
    form (whose slice copies are the larger transient) for a problem it has not run. Applies to the
    whole process.
    """
    global _weight_grad_method
    if method not in WEIGHT_GRAD_METHODS:
        raise InputError(f"method: expected one of {', '.join(map(repr, WEIGHT_GRAD_METHODS))}, got {method!r}. "
                         "Pass e.g. set_weight_grad_method('aten') for oneDNN's 3-D weight gradient everywhere.")
    _weight_grad_method = method


WEIGHT_GRAD_HALVES_MIN_BYTES = 64 * 2**20
"""Under gradient checkpointing, an output gradient or input of this many bytes (one sample, ungrouped)
has the oneDNN weight gradient computed by halves of its channels (see the module docs)."""


def _aten_weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, *, stride: tuple[int, int, int],
                      padding: tuple[int, int, int], groups: int, by_halves: bool = False) -> Tensor:
    """oneDNN's 3-D weight gradient; for a volume PyTorch would leave to `slow_conv3d`, with depth moved last;
    with `by_halves`, a large one by halves of the output, then of the input channels."""
    arguments = {"stride": stride, "padding": padding, "groups": groups, "by_halves": by_halves}
    if by_halves and grad_out.shape[0] == 1 and groups == 1 and grad_out.is_contiguous() and x.is_contiguous():
        # One sample: a run of channels is a contiguous block, so each half is a view, not a copy.
        if _halves_pay(grad_out):
            return torch.cat([_aten_weight_grad(grad_out[:, half], x, weight[half], **arguments)
                              for half in _halves(grad_out.shape[1])])
        if _halves_pay(x):
            return torch.cat([_aten_weight_grad(grad_out, x[:, half], weight[:, half], **arguments)
                              for half in _halves(x.shape[1])], dim=1)
    if cpu_kernels(x) and depth_last_reaches_onednn(x, weight, groups):
        (sd, sh, sw), (pd, ph, pw) = stride, padding
        grad = _aten_weight_grad(rearrange(grad_out, "b c d h w -> b c h w d"), rearrange(x, "b c d h w -> b c h w d"),
                                 rearrange(weight, "o i d h w -> o i h w d"), stride=(sh, sw, sd), padding=(ph, pw, pd),
                                 groups=groups)
        return rearrange(grad, "o i h w d -> o i d h w")
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, (1, 1, 1), False,
                                               (0, 0, 0), groups, [False, True, False])[1]


def _halves_pay(t: Tensor) -> bool:
    return t.shape[1] % 2 == 0 and t.numel() * t.element_size() >= WEIGHT_GRAD_HALVES_MIN_BYTES


def _halves(channels: int) -> tuple[slice, slice]:
    return slice(0, channels // 2), slice(channels // 2, channels)


def _matmul_weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, **_: Any) -> Tensor:
    """A pointwise kernel's weight gradient as `grad_out @ x^T` over the voxels, summed over the batch."""
    product = torch.matmul(grad_out.flatten(2), x.flatten(2).transpose(1, 2))  # (b, c_out, c_in)
    return product.sum(0).view(weight.shape)


def chosen_weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, *, stride: tuple[int, int, int],
                        padding: tuple[int, int, int], groups: int, by_halves: bool = False) -> Tensor:
    """The weight gradient by the method `set_weight_grad_method` chose; "auto" measures once per problem.
    `by_halves` (under gradient checkpointing): oneDNN's form by halves of large operands (module docs)."""
    forms = {"depth_taps": weight_grad_by_depth_taps, "aten": partial(_aten_weight_grad, by_halves=by_halves)}
    if pointwise(weight, stride, groups):
        forms["matmul"] = _matmul_weight_grad
    arguments = {"stride": stride, "padding": padding, "groups": groups}
    problem = (tuple(x.shape), x.stride(), tuple(weight.shape), tuple(grad_out.shape), grad_out.stride(), stride,
               padding, groups, x.dtype, torch.get_num_threads(), by_halves)
    method = _weight_grad_method
    if method == "auto" and x.device.type == "meta":  # the memory planner: what a CPU run here would pick
        method = _fastest_form.get(problem, "depth_taps")
    if method != "auto":
        return forms[method](grad_out, x, weight, **arguments)
    if problem in _fastest_form:
        return forms[_fastest_form[problem]](grad_out, x, weight, **arguments)
    seconds, results = {}, {}
    for name in (*forms, *forms):  # the first round builds oneDNN's kernels; the second is timed
        start = time.perf_counter()
        results[name] = forms[name](grad_out, x, weight, **arguments)
        seconds[name] = time.perf_counter() - start
    _fastest_form[problem] = min(seconds, key=seconds.get)
    return results[_fastest_form[problem]]


def weight_grad_by_depth_taps(grad_out: Float[Tensor, "b c_out d_out h_out w_out"], x: Float[Tensor, "b c_in d h w"],
                              weight: Float[Tensor, "c_out c_w kd kh kw"], *, stride: tuple[int, int, int],
                              padding: tuple[int, int, int], groups: int = 1) -> Float[Tensor, "c_out c_w kd kh kw"]:
    """The gradient of `F.conv3d(x, weight, stride=stride, padding=padding, groups=groups)`'s weight, as
    `kd` 2-D weight gradients (see the module docs). Equal to the 3-D one up to summation order."""
    taps, depth_stride, depth_padding = weight.shape[2], stride[0], padding[0]
    depth, depth_out = x.shape[2], grad_out.shape[2]
    # One copy each, slices first: every tap then reads contiguous runs of whole slices.
    x_slices = rearrange(x, "b c d h w -> b d c h w").contiguous()
    grad_slices = rearrange(grad_out, "b c d h w -> b d c h w").contiguous()
    planar = weight[:, :, 0]
    per_tap = []
    for tap in range(taps):
        offset = tap - depth_padding  # output slice o meets input slice o * depth_stride + offset
        first = max(0, -(offset // depth_stride))
        last = min(depth_out - 1, (depth - 1 - offset) // depth_stride)
        if last < first:  # this tap only ever meets the zero padding
            per_tap.append(torch.zeros_like(planar))
            continue
        inputs = x_slices[:, first * depth_stride + offset:last * depth_stride + offset + 1:depth_stride]
        grads = grad_slices[:, first:last + 1]
        per_tap.append(torch.ops.aten.convolution_backward(
            grads.flatten(0, 1), inputs.flatten(0, 1), planar, None, stride[1:], padding[1:], (1, 1), False, (0, 0),
            groups, [False, True, False])[1])
    return torch.stack(per_tap, dim=2)
