"""`GroupNorm`: torch's group normalisation, refusing a volume that leaves one value per group.

Where a feature map has one channel per group and a 1x1x1 volume, each group holds a single value
per sample, and normalising it gives exactly 0 whatever it was: the features are erased. torch says
so only in training and only for a batch of 1 ("Expected more than 1 value per channel when
training"); otherwise it returns the zeros in silence. `UNet3D` refuses such an input up front from
its plan; this is the same check for a block used on its own.
"""

import math
from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from cpcbm_blocks.errors import InputError

__all__ = ["GroupNorm"]


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and state dict) that checks each group holds at least 2 values."""

    def check(self, channels: int, volume: Sequence[int]) -> None:
        """Refuse a `channels`-channel map over `volume` (depth, height, width) that leaves 1 value per group."""
        values = channels // self.num_groups * math.prod(volume)
        if values < 2:
            raise InputError(f"GroupNorm: x: expected at least 2 values per group and sample (channels per group "
                             f"x depth x height x width), got {values}: {channels} channels in {self.num_groups} "
                             f"groups on a {'x'.join(map(str, volume))} volume, which GroupNorm would normalise to 0. "
                             "Use a larger volume, or fewer groups.")

    def check_input(self, x: Tensor) -> None:
        """`check` on `x`'s channels and volume; nothing while fx traces (its sizes are symbolic). Blocks call it
        first thing in `forward`, so the refusal comes before any compute."""
        if not is_fx_symbolic_tracing():
            self.check(x.shape[1], x.shape[2:])

    def forward(self, x: Float[Tensor, "b c *volume"]) -> Float[Tensor, "b c *volume"]:
        self.check_input(x)
        return super().forward(x)
