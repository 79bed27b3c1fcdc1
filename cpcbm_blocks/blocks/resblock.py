"""`ResBlock3D`: the residual block of the diffusion UNet, with timestep injection."""

import operator

from jaxtyping import Float
from torch import Tensor, nn

from cpcbm_blocks.blocks.conv import Conv3d, zero_init
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.rematerialize import recomputable, recomputable_product
from cpcbm_blocks.spec import TimestepInjection, check_channel_multiple

__all__ = ["ResBlock3D"]


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-conv, timestep injection, GroupNorm-SiLU-dropout-conv, plus a skip.

    $$ h = \\mathrm{conv}_1(\\mathrm{SiLU}(\\mathrm{GN}_1(x))),\\qquad
       y = \\mathrm{skip}(x) + \\mathrm{conv}_2(\\mathrm{drop}(\\mathrm{SiLU}(\\mathrm{inject}(h, e)))) $$

    with `inject(h, e) = GN_2(h + W e)` (additive, DDPM) or `GN_2(h) (1 + s) + b` where
    `(s, b) = W e` (scale-shift, guided-diffusion's `use_scale_shift_norm`). `conv_2` is
    zero-initialised, so a fresh block is `skip(x)`: the identity when channels are unchanged, a
    1x1x1 projection otherwise.

    ??? cite "He et al. 2016 (residual blocks); Ho et al. 2020 (DDPM); Dhariwal & Nichol 2021 (scale-shift)"

    **Arguments:**

    - `in_channels`, `out_channels`: channels in and out; a 1x1x1 skip projection is added when they differ.
    - `emb_channels`: width of the timestep embedding `emb`; None for a block without one (as in the
      conditional-image encoder, which does not depend on the diffusion time).
    - `num_groups`: GroupNorm groups; must divide `in_channels` and `out_channels`.
    - `kernel_size`: per-axis kernel, `(3, 3, 3)` or `(1, 3, 3)` on 1-deep levels.
    - `timestep_injection`: [`TimestepInjection.ADD`][cpcbm_blocks.spec.TimestepInjection] or `SCALE_SHIFT`.
    - `dropout`: dropout probability before the second convolution.
    """

    def __init__(self, *, in_channels: int, out_channels: int, emb_channels: int | None, num_groups: int = 32,
                 kernel_size: tuple[int, int, int] = (3, 3, 3),
                 timestep_injection: TimestepInjection = TimestepInjection.ADD, dropout: float = 0.0) -> None:
        super().__init__()
        check_channel_multiple("ResBlock3D(in_channels=...)", in_channels, of=num_groups, of_name="num_groups")
        check_channel_multiple("ResBlock3D(out_channels=...)", out_channels, of=num_groups, of_name="num_groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.timestep_injection = TimestepInjection(timestep_injection)
        scale_shift = self.timestep_injection is TimestepInjection.SCALE_SHIFT
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = Conv3d(in_channels, out_channels, kernel_size=kernel_size)
        self.emb_proj = (None if emb_channels is None else
                         nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1))))
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(Conv3d(out_channels, out_channels, kernel_size=kernel_size))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else Conv3d(in_channels, out_channels, kernel_size=(1, 1, 1)))

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.in_channels} d h w"],
                emb: Float[Tensor, "b {self.emb_channels}"] | None = None) -> Float[Tensor, "b {self.out_channels} d h w"]:
        # Inside `rematerialized_saves()` (how UNet3D trains) the norms' and activations' outputs are
        # saved for backward as their recipes, so this block holds only x and conv1's output; with
        # `products=True` (a checkpointed level) conv1's output is a recipe too, run once in backward.
        h = recomputable_product(self.conv1, recomputable(self.act, recomputable(self.norm1, x)))
        if (emb is None) != (self.emb_proj is None):
            raise InputError(f"emb: expected {'no embedding' if self.emb_proj is None else 'a timestep embedding'} "
                             f"(emb_channels={self.emb_channels}), got {'None' if emb is None else tuple(emb.shape)}. "
                             "Pass emb exactly when the block was built with emb_channels.")
        if self.emb_proj is None:
            h = recomputable(self.act, recomputable(self.norm2, h))
            return self.skip(x) + self.conv2(self.dropout(h))
        e = self.emb_proj(emb)[:, :, None, None, None]
        if self.timestep_injection is TimestepInjection.SCALE_SHIFT:
            scale, shift = e.chunk(2, dim=1)
            h = recomputable(_scale_shift, recomputable(self.norm2, h), scale, shift)
        else:
            h = recomputable(self.norm2, recomputable(operator.add, h, e))
        h = self.conv2(self.dropout(recomputable(self.act, h)))
        return self.skip(x) + h


def _scale_shift(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return h * (1 + scale) + shift
