"""`Conv3d` and `conv3d`: a 3-D convolution that runs as a 2-D one wherever that is exact and faster.

Three exact reformulations, all with the same weights (tests check each against `F.conv3d`, gradients
included):

* **Planar kernels.** A `(1, k, k)` kernel never mixes depth slices, so it is a 2-D convolution
  applied to every slice: `F.conv2d` over `(B*D, C, H, W)`.
* **Shallow volumes.** When the volume is no deeper than the kernel (`D <= k_d`, e.g. the 2-slice
  level of an 8-slice MRI stack), every output slice is a sum of 2-D convolutions of the input
  slices with the kernel's depth taps. Folding depth into channels makes that one `F.conv2d` from
  `D*C_in` to `D_out*C_out` channels with a block weight (tap `i - o*s_d + p_d` in block `(o, i)`,
  zero where it would fall outside the kernel). For `D <= k_d` this does no more multiply-adds than
  the 3-D form, which spends a third of them on the zero padding at `D = 2`.
* **Small batch-1 volumes, on CPU.** PyTorch's CPU backend choice looks at `N*C*D*H` only
  (`use_mkldnn` in ATen's `Convolution.cpp`, mirrored by `runs_on_onednn`): a batch-1 volume such as
  `(1, 32, 8, 64, 64)` or `(1, 64, 4, 64, 64)` runs `slow_conv3d` although oneDNN's kernel is several
  times faster. A stride-1 convolution with an odd kernel calls oneDNN's operator
  (`aten.mkldnn_convolution`) directly, in the input's own layout; its input gradient is the same
  operator with the kernel flipped and its channels swapped (a stride-1 transposed convolution with
  "same" padding), and its weight gradient is the measured choice below. It writes no permuted
  copies, and on a 2-core AVX-512 machine its forward ran faster than with depth moved last
  (`benchmarks/bench_small_volumes.py`: 64 -> 64 channels at `(4, 64, 64)`, 14.5 against 17.7 ms;
  the 1-channel stem at `(8, 256, 256)`, 9.8 against 17.4 ms). A strided convolution (a downsampler) instead
  moves depth to the last axis (input, kernel, stride and padding together), which is the same
  convolution, and whose `N*C*H*W` picks oneDNN.

The first two matter for the deep levels of the default UNet (where `slow_conv3d` would run), the
third for inputs smaller than the nominal 256x256 (and for the stem at any size).

* **Few output channels, on CPU.** oneDNN pads output channels to its channel block, so the output
  head (32 channels to 1) costs as much as a convolution to 16. `conv3d_by_taps`
  (`cpcbm_blocks.blocks.conv_by_taps`) computes every (output channel, tap) product as one matrix
  product and sums shifted slices of it: 4.4x faster for the head at full size.

* **Pointwise kernels.** A `1x1x1` convolution is a matrix product over channels. Its forward and
  input gradient run on oneDNN, which on an AVX-512 machine was 1.2-2x faster than the matrix
  products at the default UNet's full-resolution shapes (`benchmarks/bench_conv_backward.py`).
  Its weight gradient is one more candidate of the measured choice below: `grad_out @ x^T` summed
  over the batch, within about 10% of oneDNN's there (either side, from run to run) and far faster
  on an AVX2 machine, where oneDNN's `1x1` weight gradient ran at about 6 GFLOP/s.

Where the network upsamples, nearest upsampling and the convolution after it run as one convolution
at the low resolution: [`upsample_conv3d`][cpcbm_blocks.blocks.upsample_conv.upsample_conv3d].

And one for training on CPU:

* **The weight gradient by depth taps, where it is faster.** Tap `a` of the kernel's depth axis
  only ever pairs output slice `o` with input slice `o*s_d + a - p_d`, so its gradient is a 2-D
  weight gradient over the batch of matching `(output, input)` slice pairs; the kernel's `k_d` taps
  are `k_d` such 2-D gradients. Which form is faster depends on the CPU
  (`benchmarks/bench_conv_backward.py`): on an AVX2 machine oneDNN's 3-D weight gradient ran at
  about 40 GFLOP/s and the taps twice as fast; on an AVX-512 one the 3-D form ran at about 190-210
  GFLOP/s, 7-32% faster than the taps over two sessions' runs. So by default
  (`set_weight_grad_method("auto")`) the first backward of each problem (shapes, strides, dtype,
  thread count) times every form that applies (for a `1x1x1` kernel also the matrix product) once
  and keeps the fastest, as `torch.backends.cudnn.benchmark` does on GPUs. Only the weight gradient changes; the
  forward and the input gradient are `F.conv3d`'s own (or, below, the same transposed convolution). `Conv3d`'s parameters keep `nn.Conv3d`'s
  names and 5-D shapes, so state dicts are interchangeable.
* **A large pointwise convolution as a matrix product.** A `1x1x1` convolution (a skip projection,
  the FiLM maps of a fusion) of one contiguous sample is `weight @ x` with the channels as rows:
  `torch.addmm` reads the NCDHW sample in place. oneDNN would first copy it into its
  channel-blocked layout (64 MiB at the full-size level 1, in forward and again for the input
  gradient), and it is no faster: forward and backward of `32 -> 32` at `(1, 32, 8, 256, 256)` took
  65 ms by matrix products against 72 ms by oneDNN. From `POINTWISE_MATMUL_MIN_BYTES` up, where
  those copies matter; smaller ones stay on oneDNN (at `(1, 64, 4, 128, 128)` it was 6% faster).
* **Under gradient checkpointing, a large weight gradient by halves.** oneDNN's 3-D weight gradient
  works on channel-blocked copies of its input and of the output gradient, both at once: 128 MiB
  at the full-size level 1, on top of everything live at that moment of backward, which is where
  a checkpointed step peaks. There (inside `rematerialized_saves(products=True)`), an output
  gradient, then an input, of `WEIGHT_GRAD_HALVES_MIN_BYTES` or more (one sample, so that each half
  is contiguous) is split in halves of its channels, one call each: 64 MiB of copies at a time.
  Measured at `(1, 32, 8, 256, 256)`: 15% more time on that operator for the output halves, 30%
  with both; without checkpointing, where time comes first, the whole gradient runs at once.
* **Under rematerialization, the input goes before the input gradient.** A convolution's backward
  reads its input for the weight gradient only; the input gradient (a transposed convolution of the
  output gradient) needs just its shape. Inside `rematerialized_saves()` the input is kept as a
  [`SavedApart`][cpcbm_blocks.rematerialize.SavedApart]: remade for the weight gradient and let go
  before the input gradient is made, where that transposed convolution runs as
  `convolution_backward`'s own input gradient would (see `_save_input_and_weight`).
"""

import contextlib
import math
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from cpcbm_blocks.blocks.conv_by_taps import by_taps_pays, conv3d_by_taps
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.rematerialize import SavedApart, recomputable, remaking_products, saves_apart

__all__ = ["WEIGHT_GRAD_METHODS", "Conv3d", "conv3d", "memory_format_of", "set_weight_grad_method", "runs_on_onednn",
           "weight_grad_by_depth_taps", "zero_init"]

SLOW_CONV_LIMIT = 20480
"""PyTorch (2.x, CPU, float32, batch 1, groups 1) runs a convolution with its own `slow_conv` kernels,
not oneDNN, when `N*C*size(2)*size(3)` (`N*C*D*H` in 3-D) is at most this (`use_mkldnn` in
aten/src/ATen/native/Convolution.cpp). The memory planner uses it too."""


def folds(depth: int, kernel_depth: int, groups: int = 1) -> bool:
    """True when a volume of this `depth` runs as one 2-D convolution with depth folded into channels."""
    return groups == 1 and 1 < kernel_depth and depth <= kernel_depth


def conv3d(x: Float[Tensor, "b c_in d h w"], weight: Float[Tensor, "c_out c_w kd kh kw"], bias: Tensor | None = None, *,
           stride: tuple[int, int, int] = (1, 1, 1), groups: int = 1) -> Float[Tensor, "b c_out d_out h_out w_out"]:
    """`F.conv3d` with "same" padding, run through the fastest exact form (see the module docs)."""
    padding = tuple(k // 2 for k in weight.shape[2:])
    stride = tuple(stride)
    if (not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and _cpu_kernels(x) and _eager()
            and by_taps_pays(x, weight, stride=stride, groups=groups)):
        return conv3d_by_taps(x, weight, bias)
    if weight.shape[2] == 1 and stride[0] == 1 and not pointwise(weight, stride, groups):
        batch = x.shape[0]
        y = F.conv2d(rearrange(x, "b c d h w -> (b d) c h w"), weight.squeeze(2), bias, stride[1:], padding[1:],
                     groups=groups)
        return rearrange(y, "(b d) c h w -> b c d h w", b=batch)
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # sizes are symbolic: keep the one plain operator
        return F.conv3d(x, weight, bias, stride, padding, groups=groups)
    if _cpu_kernels(x) and _eager() and _pointwise_as_matmul(x, weight, stride, groups):
        return _pointwise_by_matmul(x, weight, bias)
    if folds(x.shape[2], weight.shape[2], groups):
        return _folded(x, weight, bias, stride, padding)
    if _cpu_kernels(x) and _eager() and _onednn_runs_it_as_is(x, weight, stride, groups):
        return _OneDnnConv3d.apply(x, weight, bias, padding)
    if _cpu_kernels(x) and _depth_last_reaches_onednn(x, weight, groups):
        (sd, sh, sw), (pd, ph, pw) = stride, padding
        y = _conv3d(rearrange(x, "b c d h w -> b c h w d"), rearrange(weight, "o i d h w -> o i h w d"), bias,
                    (sh, sw, sd), (ph, pw, pd), 1)
        # In x's layout, not a permuted view, which every later norm would copy (and hold for backward).
        return rearrange(y, "b c h w d -> b c d h w").contiguous(memory_format=memory_format_of(x))
    return _conv3d(x, weight, bias, stride, padding, groups)


POINTWISE_MATMUL_MIN_BYTES = 32 * 2**20
"""From an input of this many bytes up (one contiguous sample), a `1x1x1` convolution on CPU is a matrix
product (see the module docs)."""


def _pointwise_as_matmul(x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> bool:
    return (pointwise(weight, stride, groups) and x.shape[0] == 1 and x.is_contiguous()
            and x.numel() * x.element_size() >= POINTWISE_MATMUL_MIN_BYTES)


def _pointwise_by_matmul(x: Float[Tensor, "1 c_in d h w"], weight: Float[Tensor, "c_out c_in 1 1 1"],
                         bias: Tensor | None) -> Float[Tensor, "1 c_out d h w"]:
    """A `1x1x1` convolution of one contiguous sample as `weight @ x` over its voxels: the channels of an
    NCDHW sample are the rows of a matrix, so no copy is made in forward or backward."""
    voxels = rearrange(x, "1 c d h w -> c (d h w)")
    matrix = rearrange(weight, "o i 1 1 1 -> o i")
    y = torch.mm(matrix, voxels) if bias is None else torch.addmm(rearrange(bias, "o -> o 1"), matrix, voxels)
    return rearrange(y, "o (d h w) -> 1 o d h w", d=x.shape[2], h=x.shape[3])


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format that keeps `x`'s layout in a tensor computed from it: channels-last where `x` is."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
            groups: int) -> Tensor:
    """`F.conv3d`; on CPU, when the weight needs a gradient, with the faster weight gradient (see the module docs)."""
    if (_cpu_kernels(x) and _eager() and weight.requires_grad and torch.is_grad_enabled()
            and _weight_grad_method != "aten"):
        return _Conv3dChosenWeightGrad.apply(x, weight, bias, stride, padding, groups)
    return F.conv3d(x, weight, bias, stride, padding, groups=groups)


def _eager() -> bool:
    """True where our own autograd functions may replace PyTorch's operators: not under CPU autocast (which
    casts inside `F.conv3d`, not in our functions) and not while compiling (inductor picks its own kernels)."""
    return not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()


WEIGHT_GRAD_METHODS = ("auto", "depth_taps", "aten")
"""How `Conv3d` computes a 3-D weight gradient on CPU: `"auto"` (time every form that applies once per
problem, keep the fastest; the default), `"depth_taps"` (`weight_grad_by_depth_taps`) or `"aten"`
(oneDNN's 3-D kernel)."""

_weight_grad_method = "auto"
_fastest_form: dict[tuple, str] = {}  # per problem, the form "auto" measured fastest


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
    if _cpu_kernels(x) and _depth_last_reaches_onednn(x, weight, groups):
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


def pointwise(weight: Tensor, stride: tuple[int, ...], groups: int = 1) -> bool:
    """True for an ungrouped, unstrided convolution whose kernel is a single tap (2-D or 3-D)."""
    return all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in stride) and groups == 1


def _chosen_weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, *, stride: tuple[int, int, int],
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


class _Conv3dChosenWeightGrad(torch.autograd.Function):
    """`F.conv3d` whose backward computes the weight gradient by the method `set_weight_grad_method` chose."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, groups):
        return F.conv3d(x, weight, bias, stride, padding, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, stride, padding, groups = inputs
        _save_input_and_weight(ctx, x, weight, stride, groups)
        ctx.stride, ctx.padding, ctx.groups = stride, padding, groups

    @staticmethod
    def backward(ctx, grad_out):
        return *_gradients(ctx, grad_out, _aten_input_grad), None, None, None


def _transposes_alike(x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> bool:
    """Whether the input gradient, as a transposed convolution, runs like `convolution_backward`'s (see below)."""
    if not x.is_contiguous() or any(step != 1 for step in stride) or not runs_on_onednn(x, weight, stride, groups):
        return False
    grad_out = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), device="meta")  # its input: shape only
    return runs_on_onednn(grad_out, weight, stride, groups)


def _save_input_and_weight(ctx, x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> None:
    """Save what a convolution's backward reads: its input and its weight. While rematerializing, the input
    of an unstrided convolution is saved apart ([`SavedApart`][cpcbm_blocks.rematerialize.SavedApart]):
    a remade input then lives only while the weight gradient is made, and is gone before the input
    gradient, a transposed convolution that needs only its shape, exists. Only where that transposed
    convolution runs as `convolution_backward`'s input gradient would, on oneDNN from a contiguous
    input without stride: PyTorch picks its backend from the transposed convolution's own input (the
    output gradient), so a 128 -> 64 convolution at `(1, 128, 4, 64, 64)` would fall to
    `slow_conv_transpose3d` and take 224 MiB where oneDNN takes 16; strided, oneDNN's transposed
    convolution took 22 MiB more at `(1, 32, 8, 128, 128)`."""
    ctx.x_shape = tuple(x.shape)
    ctx.by_halves = remaking_products()  # checkpointing: the weight gradient's copies by halves
    ctx.x_apart = SavedApart(x) if saves_apart() and _transposes_alike(x, weight, stride, groups) else None
    ctx.save_for_backward(*(() if ctx.x_apart is not None else (x,)), weight)


def _gradients(ctx, grad_out: Tensor, input_grad) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The input, weight and bias gradients a convolution's backward owes, those its inputs need: the
    weight gradient by the chosen form, the input gradient by `input_grad(grad_out, x, weight, ctx)`
    (`x` is None where it was saved apart: it is gone by then)."""
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    if ctx.x_apart is None:
        x, weight = ctx.saved_tensors
    else:
        (weight,) = ctx.saved_tensors
        x = ctx.x_apart.unpack() if need_weight else None
    grad_x = grad_weight = grad_bias = None
    if need_bias:
        grad_bias = grad_out.sum(dim=(0, 2, 3, 4))
    if need_weight:  # first: the depth taps' slice copies are gone before grad_x exists
        grad_weight = _chosen_weight_grad(grad_out, x, weight, stride=ctx.stride, padding=ctx.padding,
                                          groups=ctx.groups, by_halves=ctx.by_halves)
    if ctx.x_apart is not None:
        x = None  # a remade input goes before the input gradient is made
    if need_x:
        grad_x = input_grad(grad_out, x, weight, ctx)
    return grad_x, grad_weight, grad_bias


def _aten_input_grad(grad_out: Tensor, x: Tensor | None, weight: Tensor, ctx) -> Tensor:
    if x is None:  # the transposed convolution, sized by the input's shape (oneDNN runs the same kernel)
        padding_out = tuple(size - ((grad_size - 1) * stride - 2 * pad + kernel)
                            for size, grad_size, stride, pad, kernel in zip(
                                ctx.x_shape[2:], grad_out.shape[2:], ctx.stride, ctx.padding, weight.shape[2:]))
        return F.conv_transpose3d(grad_out, weight, None, ctx.stride, ctx.padding, padding_out, ctx.groups)
    # The input gradient alone: asking aten for the bias gradient too takes a path 4x slower.
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, ctx.stride, ctx.padding, (1, 1, 1), False,
                                               (0, 0, 0), ctx.groups, [True, False, False])[0]


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


def _folded(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...]) -> Tensor:
    depth, taps = x.shape[2], weight.shape[2]
    depth_out = (depth + 2 * padding[0] - taps) // stride[0] + 1
    # (D_out*C_out, D*C_in, kh, kw): D^2 times the weight, so saved for backward as its recipe when it can be
    folded = recomputable(_fold_depth_into_channels, weight, depth=depth, stride=stride[0], padding=padding[0])
    # Merging depth into channels copies x; saved by the convolution, that copy is a recipe too.
    planes = recomputable(rearrange, x, "b c d h w -> b (d c) h w")
    y = F.conv2d(planes, folded, None if bias is None else bias.repeat(depth_out), stride[1:], padding[1:])
    # In x's layout, not a permuted view, which every later norm would copy (and hold for backward).
    return rearrange(y, "b (d c) h w -> b c d h w", d=depth_out).contiguous(memory_format=memory_format_of(x))


def _fold_depth_into_channels(weight: Tensor, *, depth: int, stride: int, padding: int) -> Tensor:
    """The block weight of `_folded`: tap `i - o*stride + padding` in block `(o, i)`, zero outside the kernel.

    One `index_select` of the taps (and of an appended zero tap for blocks outside the kernel), so its
    backward is one `index_add`, whatever the depth."""
    taps = weight.shape[2]
    depth_out = (depth + 2 * padding - taps) // stride + 1
    zero_tap = weight.new_zeros(weight.shape[:2] + (1,) + weight.shape[3:])
    blocks = [i - o * stride + padding for o in range(depth_out) for i in range(depth)]
    index = torch.tensor([tap if 0 <= tap < taps else taps for tap in blocks], device=weight.device)
    folded = torch.cat([weight, zero_tap], dim=2).index_select(2, index)  # (C_out, C_in, D_out*D, kh, kw)
    return rearrange(folded, "co ci (do di) kh kw -> (do co) (di ci) kh kw", do=depth_out).contiguous()


META_DEVICES = ("cpu", "cuda")
"""What the `meta` device can stand for (`meta_stands_for`), and so what a memory plan can be made for."""

_meta_stands_for = "cpu"


@contextlib.contextmanager
def meta_stands_for(device: str) -> Iterator[None]:
    """Within, convolutions on the `meta` device take the forms a run on `device` (`"cpu"`, the default
    outside, or `"cuda"`) would take: how the memory planner plans a GPU step with the GPU's forms."""
    global _meta_stands_for
    if device not in META_DEVICES:
        raise InputError(f"device: expected one of {list(META_DEVICES)}, got {device!r}. "
                         "Pass the device the plan is for.")
    before, _meta_stands_for = _meta_stands_for, device
    try:
        yield
    finally:
        _meta_stands_for = before


def _cpu_kernels(x: Tensor) -> bool:
    """Take the CPU paths: on CPU, and on `meta` while it stands for a CPU step (the memory planner)."""
    return x.device.type == "cpu" or (x.device.type == "meta" and _meta_stands_for == "cpu")


def runs_on_onednn(x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> bool:
    """Whether PyTorch's CPU backend hands this float32 convolution to oneDNN rather than its own
    `slow_conv` kernels (`use_mkldnn` in ATen's `Convolution.cpp`, for the undilated convolutions here).
    The memory planner models each backend's temporaries by it."""
    if pointwise(weight, stride) and x.shape[0] < 16 and torch.get_num_threads() == 1:
        return False  # a matrix product of PyTorch's own
    return _sizes_reach_onednn(x, weight, groups)


def _sizes_reach_onednn(x: Tensor, weight: Tensor, groups: int) -> bool:
    """The part of `runs_on_onednn` that reads sizes (and no thread count, which `torch.compile` cannot trace)."""
    return (x.shape[0] > 1 or groups > 1 or math.prod(x.shape[:4]) > SLOW_CONV_LIMIT
            or (weight.shape[-1] > 3 and weight.shape[-2] > 3))


def _onednn_runs_it_as_is(x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> bool:
    """Where `_OneDnnConv3d` applies and pays: a float32 convolution PyTorch would leave to its own kernels,
    ungrouped, stride 1, with an odd kernel ("same" padding keeps the size, so the input gradient is a
    convolution too). Pointwise kernels included: on one thread or two, oneDNN's ran 1.3-3x faster
    than PyTorch's own at `(1, 32, 4, 64, 64)` to 64 channels and the like."""
    return (x.dtype == torch.float32 and groups == 1 and all(s == 1 for s in stride)
            and all(k % 2 for k in weight.shape[2:]) and not runs_on_onednn(x, weight, stride, groups))


class _OneDnnConv3d(torch.autograd.Function):
    """A stride-1 "same" convolution through `aten.mkldnn_convolution`, whatever PyTorch's backend heuristic
    would pick (see the module docs). Saves what `F.conv3d` saves: the input and the weight."""

    @staticmethod
    def forward(x, weight, bias, padding):
        return _mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, padding = inputs
        _save_input_and_weight(ctx, x, weight, (1, 1, 1), 1)
        ctx.stride, ctx.padding, ctx.groups = (1, 1, 1), padding, 1

    @staticmethod
    def backward(ctx, grad_out):
        return *_gradients(ctx, grad_out, _transposed_input_grad), None


def _transposed_input_grad(grad_out: Tensor, x: Tensor | None, weight: Tensor, ctx) -> Tensor:
    """The transposed convolution, as a convolution: the kernel flipped along every axis, in and out channels swapped."""
    flipped = rearrange(weight.flip(2, 3, 4), "o i d h w -> i o d h w").contiguous()
    return _mkldnn_convolution(grad_out, flipped, None, list(ctx.padding), [1, 1, 1], [1, 1, 1], 1)


_mkldnn_convolution = torch.ops.aten.mkldnn_convolution


def _mkldnn_convolution_meta(x, weight, bias, padding, stride, dilation, groups):
    """Output of `aten.mkldnn_convolution` on `meta`, where PyTorch has no kernel for it: the memory planner
    runs the forms a CPU step runs. oneDNN writes channels-last when the input or the weight is."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, p, s, d in zip(x.shape[2:], weight.shape[2:], padding, stride, dilation)]
    out = x.new_empty((x.shape[0], weight.shape[0], *spatial))
    channels_last = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if any(t.is_contiguous(memory_format=channels_last) and not t.is_contiguous() for t in (x, weight)):
        return out.contiguous(memory_format=channels_last)
    return out


def _mkldnn_convolution_flops(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *, out_shape) -> int:
    """`FlopCounterMode`'s formula for `aten.mkldnn_convolution`, which torch's registry lacks: a convolution's."""
    return conv_flop_count(x_shape, w_shape, out_shape)


# Taught to torch once per process, and only what it lacks: FlopCounterMode (and so the memory planner and
# the benchmarks) counts this operator's FLOPs, and the meta device runs it.
if _mkldnn_convolution not in flop_registry:
    register_flop_formula(_mkldnn_convolution)(_mkldnn_convolution_flops)
if not torch._C._dispatch_has_kernel_for_dispatch_key(_mkldnn_convolution.default.name(), "Meta"):
    _ATEN_META = torch.library.Library("aten", "IMPL")  # kept alive: the registration lasts as long as the library
    _ATEN_META.impl("mkldnn_convolution", _mkldnn_convolution_meta, "Meta")


def _depth_last_reaches_onednn(x: Tensor, weight: Tensor, groups: int) -> bool:
    """True when the sizes keep this convolution from oneDNN and would not with depth moved last (PyTorch's
    check reads `N*C*D*H`, which becomes `N*C*H*W`). A batch of two or more already runs on oneDNN. The
    thread count, which `runs_on_onednn` also reads for pointwise kernels, is the same either way."""
    return not _sizes_reach_onednn(x, weight, groups) and _sizes_reach_onednn(x.movedim(2, -1), weight.movedim(2, -1),
                                                                              groups)


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` ("same" padding by default) with exact 2-D fast paths (see the module docs)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: tuple[int, int, int],
                 stride: tuple[int, int, int] = (1, 1, 1), bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                         padding=tuple(k // 2 for k in kernel_size), bias=bias)

    @property
    def planar(self) -> bool:
        """True when the kernel and stride leave depth alone, so the 2-D path applies."""
        return self.kernel_size[0] == 1 and self.stride[0] == 1

    def folds(self, depth: int) -> bool:
        """True when a volume of this `depth` runs as one 2-D convolution with depth folded into channels."""
        return not self.planar and folds(depth, self.kernel_size[0], self.groups)

    def forward(self, x: Float[Tensor, "b c_in d h w"],
                shift: Float[Tensor, " c_out"] | None = None) -> Float[Tensor, "b c_out d_out h_out w_out"]:
        """The convolution of `x`; plus `shift` per output channel, if given, at no extra pass over the output
        (it joins the bias: how a residual block adds one sample's timestep embedding)."""
        bias = self.bias
        if shift is not None:
            if tuple(shift.shape) != (self.out_channels,):  # a (1,) or (b, c) shift would broadcast silently
                raise InputError(f"shift: expected one value per output channel, shape ({self.out_channels},), got "
                                 f"{tuple(shift.shape)}. Add a per-sample term to the output instead.")
            bias = shift if bias is None else bias + shift
        return conv3d(x, self.weight, bias, stride=self.stride, groups=self.groups)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module`, so a residual branch ending in it starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module
