"""`Downsample3D` and `Upsample3D`: per-axis strided convolution down, nearest + convolution up."""

from jaxtyping import Float
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from cpcbm_blocks.arguments import as_triple, check_counts
from cpcbm_blocks.blocks.conv import Conv3d
from cpcbm_blocks.blocks.upsample_conv import upsample_conv3d
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.errors import InputError

__all__ = ["Downsample3D", "Upsample3D"]


class Downsample3D(nn.Module):
    """A convolution with per-axis `stride`: `(2, 2, 2)` halves every axis, `(1, 2, 2)` keeps depth.

    Anisotropic strides (nnU-Net's per-stage strides) let a short MRI stack (8 slices) stop halving
    its depth at 1 while height and width keep shrinking. Sizes must be multiples of the stride: the
    UNet checks this up front, and this block checks it again before its convolution.

    **Arguments:**

    - `channels`: channels in and out.
    - `stride`: per-axis (depth, height, width) factor.
    - `kernel_size`: per-axis kernel; at least 3 taps along each strided axis.
    """

    def __init__(self, *, channels: int, stride: tuple[int, int, int] = (2, 2, 2),
                 kernel_size: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        check_counts("Downsample3D", channels=channels)
        self.channels = channels
        self.stride = as_triple("Downsample3D(stride=...)", stride)
        kernel_size = as_triple("Downsample3D(kernel_size=...)", kernel_size, odd=True)
        self.conv = Conv3d(channels, channels, kernel_size=kernel_size, stride=self.stride)

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.channels} d h w"]
                ) -> Float[Tensor, "b {self.channels} d//{self.stride[0]} h//{self.stride[1]} w//{self.stride[2]}"]:
        # Checked before the convolution, which would otherwise round an odd size down in silence
        # (not while fx traces: its sizes are symbolic).
        if not is_fx_symbolic_tracing() and any(size % stride for size, stride in zip(x.shape[2:], self.stride)):
            raise InputError(f"Downsample3D.forward: x: expected (depth, height, width) multiples of the stride "
                             f"{self.stride}, got {tuple(x.shape[2:])}. Crop or pad the volume to multiples of it.")
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest-neighbour upsampling by per-axis `stride`, then a convolution.

    The inverse of [`Downsample3D`][cpcbm_blocks.blocks.sampling.Downsample3D] in shape. Nearest +
    convolution avoids the checkerboard artefacts of a transposed convolution (Odena et al. 2016).
    Both run as one convolution at the low resolution (`upsample_conv3d` in `cpcbm_blocks.blocks.upsample_conv`):
    the same function with 8/27 of the multiply-adds for a `(2, 2, 2)` stride, and the upsampled
    volume is never materialised.

    **Arguments:**

    - `channels`: channels in and out.
    - `stride`: per-axis (depth, height, width) upsampling factor.
    - `kernel_size`: per-axis kernel of the convolution after upsampling.
    """

    def __init__(self, *, channels: int, stride: tuple[int, int, int] = (2, 2, 2),
                 kernel_size: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        check_counts("Upsample3D", channels=channels)
        self.channels = channels
        self.stride = as_triple("Upsample3D(stride=...)", stride)
        self.conv = Conv3d(channels, channels, kernel_size=as_triple("Upsample3D(kernel_size=...)", kernel_size,
                                                                     odd=True))

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.channels} d h w"]
                ) -> Float[Tensor, "b {self.channels} d*{self.stride[0]} h*{self.stride[1]} w*{self.stride[2]}"]:
        return upsample_conv3d(x, self.conv.weight, self.conv.bias, scale=self.stride)
