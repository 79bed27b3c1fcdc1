"""The UNet as a flat program of steps, derived from the spec alone (no shapes, no torch).

The seed documents its UNet as one linear chain of transitions (`->(res)->`, `->(down)->`, ...).
[`layout`][cpcbm_blocks.layout.layout] writes that chain down for any spec: each
[`Step`][cpcbm_blocks.layout.Step] says which operation runs, its channels, its stride and kernel,
whether it concatenates a skip first and whether its output is kept as a skip.
[`UNet3D`][cpcbm_blocks.unet.UNet3D] builds one module per step and runs the steps in this order;
[`plan`][cpcbm_blocks.plan.plan] adds the shapes. Both therefore follow the same chain by construction.
"""

import dataclasses
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from cpcbm_blocks.spec import FusionKind, Triple, UNetSpec

__all__ = ["Op", "Section", "Step", "layout"]


class Section(str, Enum):
    """Where a step sits: the seed's three sections, plus the output head beyond the seed's trace."""

    DOWN = "down"
    MID = "mid"
    UP = "up"
    HEAD = "head"


class Op(str, Enum):
    """The operation of a step, named as in the seed's `h:` notation."""

    CONV_IN = "conv_in"
    RES = "res"
    ATTN = "attn"
    DOWN = "down"
    UP = "up"
    HEAD = "head"
    FUSE_GATED = "fuse_gated"
    FUSE_DYNAMIC_CONV = "fuse_dynconv"
    FUSE_CROSS_ATTENTION = "fuse_xattn"

    @property
    def is_fusion(self) -> bool:
        """True for the shape-preserving steps that fuse a condition (absent from the seed's trace)."""
        return self in _FUSION_OPS.values()


_FUSION_OPS = {FusionKind.GATED: Op.FUSE_GATED, FusionKind.DYNAMIC_CONV: Op.FUSE_DYNAMIC_CONV,
               FusionKind.CROSS_ATTENTION: Op.FUSE_CROSS_ATTENTION}


@dataclass(frozen=True, kw_only=True)
class Step:
    """One transition of the UNet's chain, without shapes."""

    section: Section
    group: int
    """Level number (1 = shallowest) on the down and up paths, segment number in the middle, 0 for
    `conv_in` and the head."""
    index: int
    """1-based position of the step inside its group."""
    op: Op
    in_channels: int
    """Channels entering the step, *after* concatenating the skip if it takes one."""
    out_channels: int
    takes_skip: bool = False
    """Concatenate the most recent unused skip to the input (the `+` of the seed notation)."""
    gives_skip: bool = False
    """Keep the output as a skip for the up path."""
    stride: Triple = (1, 1, 1)
    """Resampling factor per axis: down divides by it, up multiplies by it."""
    kernel_size: Triple = (3, 3, 3)
    module_key: str = ""
    """Name of the module that runs this step. Segments with shared weights share a key."""
    condition_key: str = ""
    """For fusion steps: the condition site they read (`level<n>` or `mid`)."""

    @property
    def beyond_seed(self) -> bool:
        """True for the output head, the one step that the seed's trace does not show."""
        return self.section is Section.HEAD

    def describe(self) -> str:
        """Human-readable position, e.g. `up level 4, step 2 (attn)`."""
        if self.section is Section.HEAD:
            return "output head (beyond the seed trace)"
        if self.op is Op.CONV_IN:
            return "down stem, step 1 (conv_in)"
        group = "segment" if self.section is Section.MID else "level"
        return f"{self.section.value} {group} {self.group}, step {self.index} ({self.op.value})"


@lru_cache(maxsize=32)
def layout(spec: UNetSpec) -> tuple[Step, ...]:
    """The chain of steps of `spec`'s UNet, in execution order.

    Down path, per level: `num_res_blocks` x [res (+ attn)], each output kept as a skip, then `down`.
    Middle: `num_segments` x [res, attn, res]. Up path, per level, deepest first: `up` (the inverse of
    that level's down stride), `num_res_blocks` x [concatenate a skip, res (+ attn)], then a res to
    the next shallower level's channels (none after level 1). Then the output head.

    A level with a fusion kind gets one shape-preserving fusion step on each path: on the way down
    after its last res/attn (the fused output is kept as that skip), on the way up after its last
    skip-consuming step. A middle segment's fusion step follows its attention. Removing the fusion
    steps gives back the unconditioned chain.
    """
    steps: list[Step] = []
    levels = spec.levels
    steps.append(Step(section=Section.DOWN, group=0, index=1, op=Op.CONV_IN, in_channels=spec.in_channels,
                      out_channels=levels[0].channels, kernel_size=levels[0].kernel_size, module_key="conv_in"))
    channels = levels[0].channels
    for number, level in enumerate(levels, start=1):
        group: list[Step] = []

        def add(op: Op, out_channels: int, key: str, **extra) -> None:
            nonlocal channels
            group.append(Step(section=Section.DOWN, group=number, index=len(group) + 1, op=op,
                              in_channels=channels, out_channels=out_channels, kernel_size=extra.pop("kernel_size", level.kernel_size),
                              module_key=f"down{number}_{key}", **extra))
            channels = out_channels

        for block in range(1, level.num_res_blocks + 1):
            add(Op.RES, level.channels, f"res{block}", gives_skip=not level.attention)
            if level.attention:
                add(Op.ATTN, level.channels, f"attn{block}", gives_skip=True)
        if level.fusion is not FusionKind.NONE:
            last = group.pop()  # the fusion step follows it and keeps the fused output as the skip instead
            group.append(dataclasses.replace(last, gives_skip=False))
            add(_FUSION_OPS[level.fusion], level.channels, "fuse", gives_skip=True, condition_key=f"level{number}")
        add(Op.DOWN, level.channels, "down", stride=level.stride, kernel_size=_down_kernel(level.kernel_size, level.stride))
        steps.extend(group)

    mid_channels = levels[-1].channels
    for segment in range(1, spec.mid.num_segments + 1):
        owner = 1 if spec.mid.share_weights else segment
        ops = [(Op.RES, "res1"), (Op.ATTN, "attn"), (Op.RES, "res2")] if spec.mid.attention else [(Op.RES, "res1"), (Op.RES, "res2")]
        if spec.mid.fusion is not FusionKind.NONE:
            ops.insert(len(ops) - 1, (_FUSION_OPS[spec.mid.fusion], "fuse"))
        for index, (op, key) in enumerate(ops, start=1):
            steps.append(Step(section=Section.MID, group=segment, index=index, op=op, in_channels=mid_channels,
                              out_channels=mid_channels, kernel_size=spec.mid.kernel_size, module_key=f"mid{owner}_{key}",
                              condition_key="mid" if op.is_fusion else ""))

    channels = mid_channels
    for number in range(len(levels), 0, -1):
        level = levels[number - 1]
        index = 0

        def add_up(op: Op, in_channels: int, out_channels: int, key: str, **extra) -> None:
            nonlocal index
            index += 1
            steps.append(Step(section=Section.UP, group=number, index=index, op=op, in_channels=in_channels,
                              out_channels=out_channels, kernel_size=level.kernel_size, module_key=f"up{number}_{key}", **extra))

        add_up(Op.UP, channels, channels, "up", stride=level.stride)
        for block in range(1, level.num_res_blocks + 1):
            add_up(Op.RES, channels + level.channels, level.channels, f"res{block}", takes_skip=True)
            channels = level.channels
            if level.attention:
                add_up(Op.ATTN, channels, channels, f"attn{block}")
        if level.fusion is not FusionKind.NONE:
            add_up(_FUSION_OPS[level.fusion], channels, channels, "fuse", condition_key=f"level{number}")
        if number > 1:
            add_up(Op.RES, channels, levels[number - 2].channels, f"res{level.num_res_blocks + 1}")
            channels = levels[number - 2].channels

    steps.append(Step(section=Section.HEAD, group=0, index=1, op=Op.HEAD, in_channels=channels,
                      out_channels=spec.out_channels, kernel_size=levels[0].kernel_size, module_key="head"))
    return tuple(steps)


def _down_kernel(kernel_size: Triple, stride: Triple) -> Triple:
    """The downsampling kernel: 3 taps along strided axes, the level's kernel along the others."""
    return tuple(3 if s > 1 else k for k, s in zip(kernel_size, stride))  # type: ignore[return-value]
