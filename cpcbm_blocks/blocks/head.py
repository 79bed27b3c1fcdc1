"""`OutputHead`: GroupNorm, SiLU and a zero-initialised convolution to the prediction's channels."""

from jaxtyping import Float
from torch import Tensor, nn

from cpcbm_blocks.arguments import as_triple, check_counts
from cpcbm_blocks.blocks.conv import Conv3d, zero_init
from cpcbm_blocks.blocks.group_norm import check_group_norm_input
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.spec import check_channel_multiple

__all__ = ["OutputHead"]


class OutputHead(nn.Module):
    """Maps the last feature map to the prediction. Zero-initialised, so a fresh UNet predicts 0.

    This is the one step beyond the seed's `h:` trace, which ends at `32,8,256,256`.

    **Arguments:**

    - `in_channels`: channels of the last feature map.
    - `out_channels`: channels of the prediction (1 for a single MRI sequence).
    - `num_groups`: GroupNorm groups.
    - `kernel_size`: per-axis kernel of the output convolution.
    """

    def __init__(self, *, in_channels: int, out_channels: int, num_groups: int = 32,
                 kernel_size: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        check_counts("OutputHead", in_channels=in_channels, out_channels=out_channels, num_groups=num_groups)
        kernel_size = as_triple("OutputHead(kernel_size=...)", kernel_size, odd=True)
        check_channel_multiple("OutputHead(in_channels=...)", in_channels, of=num_groups, of_name="num_groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm = nn.GroupNorm(num_groups, in_channels)
        self.act = nn.SiLU()
        self.conv = zero_init(Conv3d(in_channels, out_channels, kernel_size=kernel_size))

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.in_channels} d h w"]) -> Float[Tensor, "b {self.out_channels} d h w"]:
        check_group_norm_input("OutputHead.forward", self.norm, x)
        return self.conv(self.act(self.norm(x)))
