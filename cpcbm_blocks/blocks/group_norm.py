"""`check_group_norm_input`: refuse a feature map that leaves one value per GroupNorm group.

Where a feature map has one channel per group and a 1x1x1 volume, each group holds a single value
per sample, and normalising it gives exactly 0 whatever it was: the features are erased. torch says
so only in training and only for a batch of 1 ("Expected more than 1 value per channel when
training"); otherwise it returns the zeros in silence. `UNet3D` refuses such an input up front from
its plan; blocks used on their own call this first thing in `forward`, before any compute.
"""

import math

from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from cpcbm_blocks.errors import InputError

__all__ = ["check_group_norm_input"]


def check_group_norm_input(where: str, norm: nn.GroupNorm, x: Tensor, *, channels: int | None = None) -> None:
    """Refuse `x` if `norm` over its volume (with `channels`, default `x`'s own) leaves 1 value per group.

    Nothing while fx traces: its sizes are symbolic.
    """
    if is_fx_symbolic_tracing():
        return
    channels = x.shape[1] if channels is None else channels
    values = channels // norm.num_groups * math.prod(x.shape[2:])
    if values < 2:
        raise InputError(f"{where}: x: expected at least 2 values per GroupNorm group and sample (channels per group "
                         f"x depth x height x width), got {values}: {channels} channels in {norm.num_groups} groups "
                         f"on a {'x'.join(map(str, x.shape[2:]))} volume, which GroupNorm would normalise to 0. "
                         "Use a larger volume, or fewer groups.")
