"""`Conv3d`: `torch.nn.Conv3d` that runs a depth-1 kernel as a 2-D convolution.

A `(1, k, k)` kernel never mixes depth slices, so it is a 2-D convolution applied to every slice.
Running it as `F.conv2d` over `(B*D, C, H, W)` computes the same numbers with the same weights (a
test checks this against `F.conv3d`), but picks PyTorch's fast 2-D kernels: for the small batch-1
volumes of the deep levels, `Conv3d` falls back to `slow_conv3d`, several times slower.
The parameters keep `nn.Conv3d`'s names and 5-D shapes, so state dicts are interchangeable.
"""

import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["Conv3d", "conv3d", "zero_init"]


def conv3d(x: Float[Tensor, "b c_in d h w"], weight: Float[Tensor, "c_out c_w kd kh kw"], bias: Tensor | None = None, *,
           stride: tuple[int, int, int] = (1, 1, 1), groups: int = 1) -> Float[Tensor, "b c_out d_out h_out w_out"]:
    """`F.conv3d` with "same" padding that runs a depth-1 kernel (and depth stride 1) as `F.conv2d`.

    Same numbers, same weights; the 2-D path folds depth into the batch (`(b d) c h w`) and picks
    PyTorch's fast 2-D kernels instead of `slow_conv3d`.
    """
    padding = tuple(k // 2 for k in weight.shape[2:])
    if weight.shape[2] != 1 or stride[0] != 1:
        return F.conv3d(x, weight, bias, stride, padding, groups=groups)
    batch = x.shape[0]
    y = F.conv2d(rearrange(x, "b c d h w -> (b d) c h w"), weight.squeeze(2), bias, stride[1:], padding[1:],
                 groups=groups)
    return rearrange(y, "(b d) c h w -> b c d h w", b=batch)


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` ("same" padding by default) with a 2-D fast path for depth-1 kernels."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: tuple[int, int, int],
                 stride: tuple[int, int, int] = (1, 1, 1), bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                         padding=tuple(k // 2 for k in kernel_size), bias=bias)

    @property
    def planar(self) -> bool:
        """True when the kernel and stride leave depth alone, so the 2-D path applies."""
        return self.kernel_size[0] == 1 and self.stride[0] == 1

    def forward(self, x: Float[Tensor, "b c_in d h w"]) -> Float[Tensor, "b c_out d_out h_out w_out"]:
        return conv3d(x, self.weight, self.bias, stride=self.stride, groups=self.groups)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module`, so a residual branch ending in it starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module
