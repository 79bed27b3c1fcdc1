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
  times faster. A stride-1 convolution calls oneDNN's operator (`aten.mkldnn_convolution`)
  directly, in the input's own layout; its input gradient is the same operator with the kernel
  flipped, its channels swapped and padding `k - 1 - p` (a stride-1 transposed convolution is one),
  and its weight gradient is the measured choice below. It writes no permuted
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

And for training on CPU:

* **The weight gradient, measured.** Which of oneDNN's 3-D kernel, 2-D kernels over depth taps or
  (for `1x1x1` kernels) a matrix product computes a weight gradient fastest depends on the CPU; the
  first backward of each problem times them and keeps the fastest
  ([`cpcbm_blocks.blocks.conv_weight_grad`][cpcbm_blocks.blocks.conv_weight_grad.set_weight_grad_method]).
  Only the weight gradient changes; the forward and the input gradient are `F.conv3d`'s own (or,
  above, the same transposed convolution). `Conv3d`'s parameters keep `nn.Conv3d`'s names and 5-D
  shapes, so state dicts are interchangeable.
* **A large pointwise convolution as a matrix product.** A `1x1x1` convolution (a skip projection,
  the FiLM maps of a fusion) of one contiguous sample is `weight @ x` with the channels as rows:
  `torch.addmm` reads the NCDHW sample in place. oneDNN would first copy it into its
  channel-blocked layout (64 MiB at the full-size level 1, in forward and again for the input
  gradient), and it is no faster: forward and backward of `32 -> 32` at `(1, 32, 8, 256, 256)` took
  65 ms by matrix products against 72 ms by oneDNN. From `POINTWISE_MATMUL_MIN_BYTES` up, where
  those copies matter; smaller ones stay on oneDNN (at `(1, 64, 4, 128, 128)` it was 6% faster).
* **Under rematerialization, the input goes before the input gradient.** A convolution's backward
  reads its input for the weight gradient only; the input gradient (a transposed convolution of the
  output gradient) needs just its shape. Inside `rematerialized_saves()` the input is kept as a
  [`SavedApart`][cpcbm_blocks.rematerialize.SavedApart]: remade for the weight gradient and let go
  before the input gradient is made, where that transposed convolution runs as
  `convolution_backward`'s own input gradient would (see `_save_input_and_weight`).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from cpcbm_blocks.arguments import as_triple, check_counts
from cpcbm_blocks.blocks.conv_by_taps import by_taps_pays, conv3d_by_taps
from cpcbm_blocks.blocks.conv_onednn import (
    cpu_kernels,
    depth_last_reaches_onednn,
    mkldnn_convolution,
    onednn_runs_it_as_is,
    pointwise,
    runs_on_onednn,
)
from cpcbm_blocks.blocks.conv_weight_grad import chosen_weight_grad, weight_grad_method
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.rematerialize import SavedApart, recomputable, remaking_products, saves_apart

__all__ = ["Conv3d", "conv3d", "memory_format_of", "zero_init"]


def folds(depth: int, kernel_depth: int, groups: int = 1) -> bool:
    """True when a volume of this `depth` runs as one 2-D convolution with depth folded into channels."""
    return groups == 1 and 1 < kernel_depth and depth <= kernel_depth


def conv3d(x: Float[Tensor, "b c_in d h w"], weight: Float[Tensor, "c_out c_w kd kh kw"], bias: Tensor | None = None, *,
           stride: tuple[int, int, int] = (1, 1, 1), groups: int = 1) -> Float[Tensor, "b c_out d_out h_out w_out"]:
    """`F.conv3d` with "same" padding, run through the fastest exact form (see the module docs)."""
    padding = tuple(k // 2 for k in weight.shape[2:])
    stride = tuple(stride)
    if (not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and cpu_kernels(x) and _eager()
            and by_taps_pays(x, weight, stride=stride, groups=groups)):
        return conv3d_by_taps(x, weight, bias)
    if weight.shape[2] == 1 and stride[0] == 1 and not pointwise(weight, stride, groups):
        batch = x.shape[0]
        y = F.conv2d(rearrange(x, "b c d h w -> (b d) c h w"), weight.squeeze(2), bias, stride[1:], padding[1:],
                     groups=groups)
        return rearrange(y, "(b d) c h w -> b c d h w", b=batch)
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # sizes are symbolic: keep the one plain operator
        return F.conv3d(x, weight, bias, stride, padding, groups=groups)
    if cpu_kernels(x) and _eager() and _pointwise_as_matmul(x, weight, stride, groups):
        return _pointwise_by_matmul(x, weight, bias)
    if folds(x.shape[2], weight.shape[2], groups):
        return _folded(x, weight, bias, stride, padding)
    if cpu_kernels(x) and _eager() and onednn_runs_it_as_is(x, weight, stride, groups):
        return _OneDnnConv3d.apply(x, weight, bias, padding)
    if cpu_kernels(x) and depth_last_reaches_onednn(x, weight, groups):
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
    if (cpu_kernels(x) and _eager() and weight.requires_grad and torch.is_grad_enabled()
            and weight_grad_method() != "aten"):
        return _Conv3dChosenWeightGrad.apply(x, weight, bias, stride, padding, groups)
    return F.conv3d(x, weight, bias, stride, padding, groups=groups)


def _eager() -> bool:
    """True where our own autograd functions may replace PyTorch's operators: not under CPU autocast (which
    casts inside `F.conv3d`, not in our functions) and not while compiling (inductor picks its own kernels)."""
    return not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()


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
        grad_weight = chosen_weight_grad(grad_out, x, weight, stride=ctx.stride, padding=ctx.padding,
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

    Built by concatenating the taps in place (one `unbind`, whose backward is one `stack`, and a `cat`
    per block row): 3-8x faster than one `index_select` along the tap axis and a permuted copy, which
    took milliseconds for the 2-8 MiB weights of the deep levels, on every forward and again in
    backward, where the weight is remade."""
    taps = weight.shape[2]
    depth_out = (depth + 2 * padding - taps) // stride + 1
    per_tap = weight.unbind(2)  # (C_out, C_in, kh, kw) each
    zero, rows = None, []
    for o in range(depth_out):
        blocks = []
        for i in range(depth):
            tap = i - o * stride + padding
            if not 0 <= tap < taps and zero is None:
                zero = weight.new_zeros(per_tap[0].shape)
            blocks.append(per_tap[tap] if 0 <= tap < taps else zero)
        rows.append(torch.cat(blocks, dim=1))  # (C_out, D*C_in, kh, kw)
    return torch.cat(rows, dim=0)  # (D_out*C_out, D*C_in, kh, kw)


class _OneDnnConv3d(torch.autograd.Function):
    """A stride-1 convolution (padding `k // 2`) through `aten.mkldnn_convolution`, whatever PyTorch's backend
    heuristic would pick (see the module docs). Saves what `F.conv3d` saves: the input and the weight."""

    @staticmethod
    def forward(x, weight, bias, padding):
        return mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, padding = inputs
        _save_input_and_weight(ctx, x, weight, (1, 1, 1), 1)
        ctx.stride, ctx.padding, ctx.groups = (1, 1, 1), padding, 1

    @staticmethod
    def backward(ctx, grad_out):
        return *_gradients(ctx, grad_out, _transposed_input_grad), None


def _transposed_input_grad(grad_out: Tensor, x: Tensor | None, weight: Tensor, ctx) -> Tensor:
    """The transposed convolution, as a convolution: the kernel flipped along every axis, in and out channels
    swapped, padded by `k - 1 - p` (`p` itself for an odd kernel's "same" padding, 0 for 2 taps padded by 1)."""
    flipped = rearrange(weight.flip(2, 3, 4), "o i d h w -> i o d h w").contiguous()
    padding = [k - 1 - p for k, p in zip(weight.shape[2:], ctx.padding)]
    return mkldnn_convolution(grad_out, flipped, None, padding, [1, 1, 1], [1, 1, 1], 1)



class Conv3d(nn.Conv3d):
    """`nn.Conv3d` ("same" padding by default) with exact 2-D fast paths (see the module docs).

    Unlike `nn.Conv3d` it takes batched `(B, C, D, H, W)` input only (its contract refuses an unbatched
    4-D one), and checks its input's dtype and device against its weights before any compute.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: tuple[int, int, int],
                 stride: tuple[int, int, int] = (1, 1, 1), bias: bool = True) -> None:
        check_counts("Conv3d", in_channels=in_channels, out_channels=out_channels)
        kernel_size = as_triple("Conv3d(kernel_size=...)", kernel_size)  # an even one pads k // 2: one more output
        stride = as_triple("Conv3d(stride=...)", stride)
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                         padding=tuple(k // 2 for k in kernel_size), bias=bias)

    @property
    def planar(self) -> bool:
        """True when the kernel and stride leave depth alone, so the 2-D path applies."""
        return self.kernel_size[0] == 1 and self.stride[0] == 1

    def folds(self, depth: int) -> bool:
        """True when a volume of this `depth` runs as one 2-D convolution with depth folded into channels."""
        return not self.planar and folds(depth, self.kernel_size[0], self.groups)

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.in_channels} d h w"],
                shift: Float[Tensor, " {self.out_channels}"] | None = None
                ) -> Float[Tensor, "b {self.out_channels} d_out h_out w_out"]:
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
