"""`ResBlock3D`: the residual block of the diffusion UNet, with timestep injection."""

import operator
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from cpcbm_blocks.arguments import as_enum, as_triple, check_counts, check_number
from cpcbm_blocks.blocks.conv import Conv3d, conv3d, zero_init
from cpcbm_blocks.blocks.group_norm import check_group_norm_input
from cpcbm_blocks.contracts import checks_active, shape_checked
from cpcbm_blocks.errors import InputError, ShapeContractError
from cpcbm_blocks.rematerialize import recomputable, recomputable_product
from cpcbm_blocks.spec import TimestepInjection, check_channel_multiple

__all__ = ["SKIP_APART_MIN_BYTES", "ResBlock3D"]

SKIP_APART_MIN_BYTES = 16 * 2**20
"""A decoder block takes its skip apart only when the concatenation would hold at least this many
bytes. What it saves is that concatenation's size a few times over; what it costs is a few more,
smaller operators, which on CPU measured up to 30% slower for a block whose concatenation is 8 MiB
(`(1, 128, 4, 64, 64)`: each 64-channel half falls onto a slower convolution path) and within 3%
from 32 MiB up."""


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-conv, timestep injection, GroupNorm-SiLU-dropout-conv, plus a skip.

    $$ h = \\mathrm{conv}_1(\\mathrm{SiLU}(\\mathrm{GN}_1(x))),\\qquad
       y = \\mathrm{skip}(x) + \\mathrm{conv}_2(\\mathrm{drop}(\\mathrm{SiLU}(\\mathrm{inject}(h, e)))) $$

    with `inject(h, e) = GN_2(h + W e)` (additive, DDPM) or `GN_2(h) (1 + s) + b` where
    `(s, b) = W e` (scale-shift, guided-diffusion's `use_scale_shift_norm`). `conv_2` is
    zero-initialised, so a fresh block is `skip(x)`: the identity when channels are unchanged, a
    1x1x1 projection otherwise.

    **A decoder block with its skip.** `block(x, emb, skip=s)` is `block(torch.cat([x, s], dim=1), emb)`
    without the concatenation: GroupNorm's groups never straddle `x` and `s` (when `x`'s channels are
    a multiple of the channels per group), so each part is normalised with its own groups and
    affine slice, and `conv_1` and the skip projection are sums of one convolution per part with
    its slice of the weight. Same parameters, same function (tested against the concatenation);
    the doubled-width input and, in backward, its norm, activation and their gradients never
    exist as one tensor. Where the groups would straddle, or the concatenation would be smaller than
    `SKIP_APART_MIN_BYTES` (where the extra, smaller operators cost more than the memory is worth),
    it concatenates.

    **One sample, additive injection.** With a batch of one, `W e` is one vector per channel, so it
    joins `conv_1`'s bias (`Conv3d.forward(x, shift=...)`): the same function without a pass over the
    volume for the add, its recomputation in backward, or the reduction that makes its gradient.

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
        check_counts("ResBlock3D", in_channels=in_channels, out_channels=out_channels, num_groups=num_groups)
        if emb_channels is not None:
            check_counts("ResBlock3D", emb_channels=emb_channels)
        kernel_size = as_triple("ResBlock3D(kernel_size=...)", kernel_size, odd=True)
        check_number("ResBlock3D(dropout=...)", dropout, at_least=0, below=1)
        check_channel_multiple("ResBlock3D(in_channels=...)", in_channels, of=num_groups, of_name="num_groups")
        check_channel_multiple("ResBlock3D(out_channels=...)", out_channels, of=num_groups, of_name="num_groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.timestep_injection = as_enum("ResBlock3D(timestep_injection=...)", timestep_injection, TimestepInjection)
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
    def forward(self, x: Float[Tensor, "b c d h w"], emb: Float[Tensor, "b {self.emb_channels}"] | None = None,
                skip: Float[Tensor, "b c_skip d h w"] | None = None) -> Float[Tensor, "b {self.out_channels} d h w"]:
        # Inside `rematerialized_saves()` (how UNet3D trains) the norms' and activations' outputs are
        # saved for backward as their recipes, so this block holds only x and conv1's output; with
        # `products=True` (a checkpointed level) conv1's output is a recipe too, run once in backward.
        # before any compute starts (the residual runs first); x may carry only part of in_channels
        check_group_norm_input("ResBlock3D.forward", self.norm1, x, channels=self.in_channels)
        check_group_norm_input("ResBlock3D.forward", self.norm2, x, channels=self.out_channels)
        parts = self._input_parts(x, skip)
        if (emb is None) != (self.emb_proj is None):
            raise InputError(f"emb: expected {'no embedding' if self.emb_proj is None else 'a timestep embedding'} "
                             f"(emb_channels={self.emb_channels}), got {'None' if emb is None else tuple(emb.shape)}. "
                             "Pass emb exactly when the block was built with emb_channels.")
        e = None if self.emb_proj is None else self.emb_proj(emb)
        # Additive injection into one sample: W e joins conv1's bias, so `h + W e` costs no pass over the
        # volume of its own, no recomputation in backward and no reduction for its gradient.
        additive = e is not None and self.timestep_injection is TimestepInjection.ADD
        # (traced graphs keep the general form: their batch size is symbolic)
        one_sample = not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and x.shape[0] == 1
        emb_in_bias = e[0] if additive and one_sample else None
        # The residual first: autograd runs the nodes made last first, so in backward the main branch
        # (its remade activations and their gradients) runs before the residual's backward has made the
        # input gradients, which then do not exist during the main branch's peak.
        residual = self._residual(parts)
        if len(parts) == 1:
            activated = recomputable(self.act, recomputable(self.norm1, parts[0]))
            h = recomputable_product(self.conv1, activated, shift=emb_in_bias)
        else:
            # Normalised and activated inside the product, part by part: remade in backward, one part's
            # activation exists at a time.
            bias = self.conv1.bias if emb_in_bias is None else self.conv1.bias + emb_in_bias
            h = recomputable_product(_conv_over_parts, parts, self.conv1.weight, bias,
                                     prepare=partial(self._activated_part, self._norm1_slices(parts)))
        if e is None:
            h = recomputable(self.act, recomputable(self.norm2, h))
            return residual + self.conv2(self.dropout(h))
        if self.timestep_injection is TimestepInjection.SCALE_SHIFT:
            scale, shift = e[:, :, None, None, None].chunk(2, dim=1)
            h = recomputable(_scale_shift, recomputable(self.norm2, h), scale, shift)
        elif emb_in_bias is None:
            h = recomputable(self.norm2, recomputable(operator.add, h, e[:, :, None, None, None]))
        else:
            h = recomputable(self.norm2, h)  # W e is in h already
        h = self.conv2(self.dropout(recomputable(self.act, h)))
        return residual + h

    def _input_parts(self, x: Tensor, skip: Tensor | None) -> list[Tensor]:
        """`[x]`, or `[x, skip]` where the norm's groups allow running them apart, else their concatenation."""
        if skip is None:  # what x's annotation would check if it could name in_channels: only while checks are on
            if checks_active() and x.shape[1] != self.in_channels:
                self._refuse_channels(x, skip)
            return [x]
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # symbolic sizes: no branching on them
            return [torch.cat([x, skip], dim=1)]
        if x.shape[1] + skip.shape[1] != self.in_channels:
            self._refuse_channels(x, skip)
        per_group = self.in_channels // self.norm1.num_groups
        small = (x.numel() + skip.numel()) * x.element_size() < SKIP_APART_MIN_BYTES
        # A group would straddle x and skip, or the identity residual needs the concatenation anyway
        if small or x.shape[1] % per_group or isinstance(self.skip, nn.Identity):
            return [recomputable(torch.cat, [x, skip], dim=1)]
        return [x, skip]

    def _refuse_channels(self, x: Tensor, skip: Tensor | None) -> None:
        given = f"x with {x.shape[1]}" + ("" if skip is None else f" and skip with {skip.shape[1]}")
        raise ShapeContractError(f"ResBlock3D.forward: {'x' if skip is None else 'x + skip'}: expected "
                                 f"{self.in_channels} input channels in all "
                                 f"(in_channels), got {given}. Pass x (and skip) whose channels add up to in_channels.")

    def _norm1_slices(self, parts: list[Tensor]) -> list[tuple[int, Tensor, Tensor]]:
        """Per part: its number of GroupNorm groups and its slices of the norm's weight and bias."""
        per_group, start, slices = self.in_channels // self.norm1.num_groups, 0, []
        for part in parts:
            stop = start + part.shape[1]
            slices.append(((stop - start) // per_group, self.norm1.weight[start:stop], self.norm1.bias[start:stop]))
            start = stop
        return slices

    def _activated_part(self, norm_slices: list[tuple[int, Tensor, Tensor]], index: int, part: Tensor) -> Tensor:
        """SiLU(GroupNorm_1(part)) with the part's groups and slices of the norm's affine parameters."""
        groups, weight, bias = norm_slices[index]
        return recomputable(self.act, recomputable(F.group_norm, part, groups, weight, bias, self.norm1.eps))

    def _residual(self, parts: list[Tensor]) -> Tensor:
        if len(parts) == 1:
            return self.skip(parts[0])
        return _conv_over_parts(parts, self.skip.weight, self.skip.bias)


def _conv_over_parts(parts: list[Float[Tensor, "b _ d h w"]], weight: Float[Tensor, "c_out c_in kd kh kw"],
                     bias: Tensor | None, *, prepare: Callable[[int, Tensor], Tensor] | None = None
                     ) -> Float[Tensor, "b c_out d h w"]:
    """`conv3d(torch.cat(parts, dim=1), weight, bias)` as a sum of one convolution per part with its slice of
    `weight`'s input channels: the concatenation is never made. With `prepare`, part `i` is first
    replaced by `prepare(i, part)` (its norm and activation), one part at a time."""
    out, start = None, 0
    for index, part in enumerate(parts):
        stop = start + part.shape[1]
        if prepare is not None:
            part = prepare(index, part)
        term = conv3d(part, weight[:, start:stop], bias if out is None else None)
        if out is None:
            out = term
        elif torch.is_grad_enabled():
            out = out + term  # not in place: a selective checkpoint may hold `out` for backward
        else:
            out += term  # remade for backward (or inference): no third full-size buffer
        start = stop
    return out


def _scale_shift(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return h * (1 + scale) + shift
