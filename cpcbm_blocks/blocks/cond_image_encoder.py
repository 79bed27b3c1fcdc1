"""`CondImageEncoder3D`: conditional images -> one feature map per UNet level."""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cpcbm_blocks.arguments import as_ints, check_counts, fail
from cpcbm_blocks.blocks.conv import Conv3d
from cpcbm_blocks.blocks.resblock import ResBlock3D
from cpcbm_blocks.blocks.sampling import Downsample3D
from cpcbm_blocks.contracts import shape_checked

__all__ = ["CondImageEncoder3D"]


class CondImageEncoder3D(nn.Module):
    """A light encoder for k co-registered conditional images: one res block and one downsampling per level.

    The input is the images multiplied by their availability, concatenated with the availability
    broadcast as k more channels: an absent image is zeros *plus a flag*, because an all-zero tumour
    mask is a legitimate value. Each level `l` runs one residual block to the level's channels (its
    output is that level's feature map, with exactly the UNet's channels and shape) and then the
    level's strided downsampling; the last downsampling gives the middle's feature map.

    This is what the seed's notes settled on after a copy of the backbone ran out of memory. It does
    not depend on the diffusion time, so a sampler encodes the conditions once and reuses them for
    every denoising step (see `UNet3D.encode_conditions`).

    ??? cite "Zhang et al. 2023 (ControlNet's condition encoder); the seed's CPC_BM notes, v1.0.1"

    **Arguments:**

    - `image_channels`: number k of conditional images.
    - `channels`: channels per UNet level, shallowest first.
    - `strides`: the UNet's per-level downsampling strides.
    - `kernel_sizes`: the UNet's per-level kernels.
    - `down_kernel_sizes`: the kernels of the UNet's per-level downsampling convolutions.
    - `num_groups`: GroupNorm groups.
    """

    def __init__(self, *, image_channels: int, channels: tuple[int, ...], strides: tuple[tuple[int, int, int], ...],
                 kernel_sizes: tuple[tuple[int, int, int], ...], down_kernel_sizes: tuple[tuple[int, int, int], ...],
                 num_groups: int = 32) -> None:
        super().__init__()
        check_counts("CondImageEncoder3D", image_channels=image_channels, num_groups=num_groups)
        channels = as_ints("CondImageEncoder3D(channels=...)", channels, minimum=1)
        per_level = {"strides": strides, "kernel_sizes": kernel_sizes, "down_kernel_sizes": down_kernel_sizes}
        for name, values in per_level.items():  # zip() below would silently drop the levels past the shortest
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != len(channels):
                raise fail(f"CondImageEncoder3D({name}=...)", f"one (depth, height, width) triple per level "
                           f"({len(channels)}, as channels has)", values, "Give one per level, shallowest first.")
        self.image_channels = image_channels
        self.channels = tuple(channels)
        self.conv_in = Conv3d(2 * image_channels, channels[0], kernel_size=kernel_sizes[0])
        previous = channels[0]
        self.res = nn.ModuleList()
        self.down = nn.ModuleList()
        for level_channels, stride, kernel, down_kernel in zip(channels, strides, kernel_sizes, down_kernel_sizes):
            self.res.append(ResBlock3D(in_channels=previous, out_channels=level_channels, emb_channels=None,
                                       num_groups=num_groups, kernel_size=kernel))
            self.down.append(Downsample3D(channels=level_channels, stride=stride, kernel_size=down_kernel))
            previous = level_channels

    @shape_checked
    def forward(self, images: Float[Tensor, "b {self.image_channels} d h w"],
                available: Bool[Tensor, "b {self.image_channels}"], *,
                checkpoint_blocks: bool = False) -> tuple[Tensor, ...]:
        """Feature maps for levels 1..L and the middle, in that order (shapes as in the UNet's plan).

        With `checkpoint_blocks=True` (and grad enabled) each block (the input convolution, each
        residual block, each downsampling) runs under `torch.utils.checkpoint` (non-reentrant), so
        that a backward holds one block's tensors at a time; `UNet3D` asks for it inside its
        checkpointed condition encoder.
        """
        run = _checkpointed if checkpoint_blocks and torch.is_grad_enabled() else _called
        flags = available.to(images.dtype)[:, :, None, None, None]
        h = run(self.conv_in, torch.cat([images * flags, flags.expand_as(images)], dim=1))
        features = []
        for res, down in zip(self.res, self.down):
            h = run(res, h)
            features.append(h)
            h = run(down, h)
        return (*features, h)


def _called(module: nn.Module, *args: Tensor) -> Tensor:
    return module(*args)


def _checkpointed(module: nn.Module, *args: Tensor) -> Tensor:
    return checkpoint(module, *args, use_reentrant=False)
