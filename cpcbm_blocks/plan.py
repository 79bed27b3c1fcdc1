"""`plan(spec, input_shape)`: the expected shape of every transition, by integer arithmetic alone.

The plan is what the UNet asserts at run time, what `cpcbm-blocks trace` prints, what the seed's
`h:` notation is parsed into, and what the docs render. It never touches torch.
"""

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from cpcbm_blocks.errors import InputError
from cpcbm_blocks.layout import Op, Step, layout
from cpcbm_blocks.spec import UNetSpec

__all__ = ["Plan", "Shape", "Transition", "check_input_shape", "plan"]

Shape = tuple[int, int, int, int]
"""A feature-map shape without the batch axis: (channels, depth, height, width), as in the seed."""

_AXES = ("depth", "height", "width")


@dataclass(frozen=True, kw_only=True)
class Transition:
    """One step of the chain with its shapes (batch axis omitted, as in the seed's notation)."""

    step: Step
    in_shape: Shape
    """The main input, before the skip is concatenated."""
    skip_shape: Shape | None
    """The skip concatenated to the input, if the step takes one."""
    out_shape: Shape

    def render(self) -> str:
        """This transition in seed notation, e.g. `256,1,32,32 + 256,1,32,32 ->(res)-> 256,1,32,32`."""
        source = _fmt(self.in_shape) + (f" + {_fmt(self.skip_shape)}" if self.skip_shape else "")
        return f"{source} ->({self.step.op.value})-> {_fmt(self.out_shape)}"

    def key(self) -> tuple:
        """What the seed's notation can express: section, group, index, op and the three shapes."""
        s = self.step
        return (s.section.value, s.group, s.index, s.op.value, self.in_shape, self.skip_shape, self.out_shape)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """All transitions of a spec's UNet for one input shape."""

    spec: UNetSpec
    input_shape: tuple[int, int, int, int, int]
    transitions: tuple[Transition, ...]

    @property
    def batch_size(self) -> int:
        return self.input_shape[0]

    @property
    def output_shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch_size, *self.transitions[-1].out_shape)

    def seed_transitions(self) -> tuple[Transition, ...]:
        """The transitions the seed's `h:` trace shows (all but the output head)."""
        return tuple(t for t in self.transitions if not t.step.beyond_seed)


def _fmt(shape: Shape | None) -> str:
    return ",".join(str(v) for v in shape) if shape else ""


def check_input_shape(spec: UNetSpec, shape: Sequence[int], *, name: str = "x",
                      channels: int | None = None) -> tuple[int, int, int, int, int]:
    """Reject an input shape the spec's UNet cannot run, with a message that says what to do.

    Checks the rank (5: batch, channels, depth, height, width), the channel count (`spec.in_channels`
    unless `channels` is given), that no axis is empty, and that depth, height and width are
    multiples of the product of the strides.
    """
    shape = _as_shape(name, shape)
    expected_channels = spec.in_channels if channels is None else channels
    if len(shape) != 5:
        hint = {4: " Add a batch axis, e.g. x.unsqueeze(0).", 3: " Add batch and channel axes, e.g. x[None, None]."}.get(
            len(shape), " Reshape it to (batch, channels, depth, height, width).")
        raise InputError(f"{name}: expected 5 dimensions (batch, channels, depth, height, width), got {len(shape)} "
                         f"with shape {shape}.{hint}")
    batch, channels, *spatial = shape
    if channels != expected_channels:
        raise InputError(f"{name}: expected {expected_channels} channel(s) (spec.in_channels) on axis 1, got {channels} "
                         f"in shape {shape}. Pass a volume with {expected_channels} channel(s) or change UNetSpec.in_channels.")
    if min(shape) < 1:
        axis = ("batch", "channels", *_AXES)[shape.index(min(shape))]
        raise InputError(f"{name}: expected every axis to be non-empty, got {axis} = {min(shape)} in shape {shape}. "
                         f"Pass at least one sample and one voxel along every axis.")
    for axis, size, multiple in zip(_AXES, spatial, spec.stride_product):
        if size % multiple:
            below, above = (size // multiple) * multiple, (size // multiple + 1) * multiple
            nearest = " or ".join(str(v) for v in (below, above) if v > 0)
            raise InputError(f"{name}: expected {axis} to be a multiple of {multiple} (the product of the {axis} strides "
                             f"of the spec's levels), got {axis} {size}. Use {axis} {nearest} (the nearest valid sizes), "
                             "or pad/crop the volume.")
    return shape  # type: ignore[return-value]


def _as_shape(name: str, shape: object) -> tuple[int, ...]:
    """A shape as a tuple of ints: a tuple, list, `torch.Size` or array of whole numbers; not a tensor, float or bool."""
    if getattr(shape, "ndim", 1) > 1:  # a tensor or an array: the volume itself, not its shape
        raise InputError(f"{name}: expected a shape such as (1, 1, 8, 256, 256), got a {type(shape).__name__} of "
                         f"shape {tuple(shape.shape)}. Pass its shape: x.shape.")  # type: ignore[attr-defined]
    try:
        values = list(shape)  # type: ignore[call-overload]
    except TypeError:
        raise InputError(f"{name}: expected a shape such as (1, 1, 8, 256, 256), got {type(shape).__name__}. "
                         "Pass a tuple of ints.") from None
    try:
        if any(isinstance(v, bool) for v in values):
            raise TypeError
        return tuple(operator.index(v) for v in values)
    except TypeError:  # a float, a bool, a float tensor's elements...
        raise InputError(f"{name}: expected whole numbers, got {tuple(values)}. Pass a tuple of ints such as "
                         "(1, 1, 8, 256, 256).") from None


def plan(spec: UNetSpec, input_shape: Sequence[int]) -> Plan:
    """The expected transitions of `spec`'s UNet on an input of `input_shape` (B, C, D, H, W).

    `input_shape` is any sequence of ints (a tuple, a list, `x.shape`). Raises
    [`InputError`][cpcbm_blocks.errors.InputError] when the shape cannot work.
    """
    if not isinstance(spec, UNetSpec):
        hint = " Pass model.spec." if hasattr(spec, "spec") else " Build one with UNetSpec.default()."
        raise InputError(f"spec: expected a UNetSpec, got {type(spec).__name__}.{hint}")
    return _plan(spec, _as_shape("input_shape", input_shape))


@lru_cache(maxsize=64)
def _plan(spec: UNetSpec, input_shape: tuple[int, ...]) -> Plan:
    full = check_input_shape(spec, input_shape)
    current: Shape = full[1:]  # type: ignore[assignment]
    skips: list[Shape] = []
    transitions = []
    for step in layout(spec):
        skip = skips.pop() if step.takes_skip else None
        c, d, h, w = current
        if step.op is Op.DOWN:
            d, h, w = d // step.stride[0], h // step.stride[1], w // step.stride[2]
        elif step.op is Op.UP:
            d, h, w = d * step.stride[0], h * step.stride[1], w * step.stride[2]
        out: Shape = (step.out_channels, d, h, w)
        transitions.append(Transition(step=step, in_shape=current, skip_shape=skip, out_shape=out))
        if step.gives_skip:
            skips.append(out)
        current = out
    _check_group_norm_sizes(spec, full, transitions)
    return Plan(spec=spec, input_shape=full, transitions=tuple(transitions))


def _check_group_norm_sizes(spec: UNetSpec, input_shape: tuple[int, ...], transitions: list[Transition]) -> None:
    """Reject an input whose feature maps would leave a GroupNorm group holding a single value.

    Every feature map between `conv_in` and the head is group-normalised. Where a map has one channel
    per group (`channels == num_groups`) and a 1x1x1 volume, each group holds one value per sample:
    GroupNorm maps it to exactly 0 (the features are erased, whatever the batch size), and torch
    raises "Expected more than 1 value per channel when training" for a batch of 1. The spec alone
    cannot rule this out (the default has 32 channels in 32 groups at level 1), so it is an input
    check: a larger volume always fixes it.
    """
    for transition in transitions:
        maps = [transition.out_shape] if transition.step.op is Op.CONV_IN else [transition.in_shape]
        if transition.step.op is not Op.HEAD and transition.step.op is not Op.CONV_IN:
            maps.append(transition.out_shape)
        for channels, d, h, w in maps:
            values = channels // spec.num_groups * d * h * w
            if values < 2:
                bigger = (input_shape[0], input_shape[1], input_shape[2] * 2, *input_shape[3:])
                raise InputError(
                    f"x: expected every GroupNorm group to hold at least 2 values per sample, got 1 value per group: "
                    f"shape {input_shape} leaves a {d}x{h}x{w} feature map of {channels} channels in "
                    f"num_groups={spec.num_groups} groups at {transition.step.describe()}, which GroupNorm would "
                    f"normalise to 0. Use a larger volume, e.g. {bigger}, or fewer groups (UNetSpec.num_groups at "
                    f"most {channels // 2}).")
