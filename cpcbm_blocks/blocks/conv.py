"""`Conv3d`: `torch.nn.Conv3d` that runs shallow convolutions as 2-D ones.

Two exact reformulations, both with the same weights (tests check them against `F.conv3d`):

* **Planar kernels.** A `(1, k, k)` kernel never mixes depth slices, so it is a 2-D convolution
  applied to every slice: `F.conv2d` over `(B*D, C, H, W)`.
* **Shallow volumes.** When the volume is no deeper than the kernel (`D <= k_d`, e.g. the 2-slice
  level of an 8-slice MRI stack), every output slice is a sum of 2-D convolutions of the input
  slices with the kernel's depth taps. Folding depth into channels makes that one `F.conv2d` from
  `D*C_in` to `D_out*C_out` channels with a block weight (tap `i - o*s_d + p_d` in block `(o, i)`,
  zero where it would fall outside the kernel). For `D <= k_d` this does no more multiply-adds than
  the 3-D form, which spends a third of them on the zero padding at `D = 2`.

Both matter on CPU: for the small batch-1 volumes of the deep levels (N*C*D*H <= 20480) PyTorch's
`Conv3d` falls back to `slow_conv3d`, several times slower than its 2-D kernels (measured in
`benchmarks/`).

A third path handles the other volumes that would hit `slow_conv3d` on CPU. PyTorch's choice looks
at `N*C*D*H` only (`use_mkldnn` in ATen's `Convolution.cpp`), so a volume that is shallow but wide,
such as `(1, 32, 8, 64, 64)`, runs the slow kernel although oneDNN's is about 5x faster. Moving depth
to the last axis (input, kernel, stride and padding together) is the same convolution, and its
`N*C*H*W` picks oneDNN. The parameters keep `nn.Conv3d`'s names and 5-D shapes, so state dicts are
interchangeable.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["Conv3d", "zero_init"]

_SLOW_CONV3D_LIMIT = 20480
"""PyTorch (2.x, CPU, float32, batch 1, groups 1) runs a 3x3x3 convolution with `slow_conv3d` when
`N*C*D*H` is at most this (`use_mkldnn` in aten/src/ATen/native/Convolution.cpp)."""


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` ("same" padding by default) with 2-D fast paths for planar kernels and shallow volumes."""

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
        return not self.planar and depth <= self.kernel_size[0]

    def forward(self, x: Float[Tensor, "b c_in d h w"]) -> Float[Tensor, "b c_out d_out h_out w_out"]:
        if self.planar:
            batch = x.shape[0]
            slices = rearrange(x, "b c d h w -> (b d) c h w")
            y = F.conv2d(slices, self.weight.squeeze(2), self.bias, self.stride[1:], self.padding[1:])
            return rearrange(y, "(b d) c h w -> b c d h w", b=batch)
        if self.folds(x.shape[2]):
            return self._folded(x)
        if x.device.type == "cpu" and _hits_slow_conv3d(x.shape):
            return self._depth_last(x)
        return super().forward(x)

    def _depth_last(self, x: Tensor) -> Tensor:
        (sd, sh, sw), (pd, ph, pw) = self.stride, self.padding
        y = F.conv3d(rearrange(x, "b c d h w -> b c h w d"), rearrange(self.weight, "o i d h w -> o i h w d"),
                     self.bias, (sh, sw, sd), (ph, pw, pd))
        return rearrange(y, "b c h w d -> b c d h w")

    def _folded(self, x: Tensor) -> Tensor:
        depth, taps, stride, pad = x.shape[2], self.kernel_size[0], self.stride[0], self.padding[0]
        depth_out = (depth + 2 * pad - taps) // stride + 1
        zero = self.weight.new_zeros(self.weight.shape[:2] + self.weight.shape[3:])
        blocks = [[self.weight[:, :, tap] if 0 <= (tap := i - o * stride + pad) < taps else zero for i in range(depth)]
                  for o in range(depth_out)]
        weight = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
        bias = None if self.bias is None else self.bias.repeat(depth_out)
        y = F.conv2d(rearrange(x, "b c d h w -> b (d c) h w"), weight, bias, self.stride[1:], self.padding[1:])
        return rearrange(y, "b (d c) h w -> b c d h w", d=depth_out)


def _hits_slow_conv3d(shape: tuple[int, ...]) -> bool:
    """True when PyTorch would pick `slow_conv3d` for this input and would not with depth moved last."""
    n, c, d, h, w = shape
    return n * c * d * h <= _SLOW_CONV3D_LIMIT < n * c * h * w


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module`, so a residual branch ending in it starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module
