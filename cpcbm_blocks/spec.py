"""The declarative UNet spec: frozen, typed, JSON round-trippable, validated at construction.

The spec is the single source of truth. The module tree
([`UNet3D`][cpcbm_blocks.unet.UNet3D]), the expected per-transition trace
([`plan`][cpcbm_blocks.plan.plan]) and every diagram are *derived* from it; no module redoes the
channel or resolution arithmetic.

A spec is a tuple of per-level records, not parallel lists, so a level's channels, residual-block
count, attention flag, downsampling stride and kernel size always travel together.
"""

import dataclasses
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cpcbm_blocks.arguments import (
    Triple,
    as_enum,
    as_ints,
    as_level_numbers,
    as_triple,
    check_bool,
    check_int,
    check_number,
    fail,
)
from cpcbm_blocks.errors import SpecError

__all__ = ["FORMAT_VERSION", "ConditioningSpec", "FusionKind", "LevelSpec", "MidSpec", "TimestepInjection", "Triple",
           "UNetSpec"]

FORMAT_VERSION = 1
"""Version of the JSON layout written by [`UNetSpec.to_json`][cpcbm_blocks.spec.UNetSpec.to_json]."""


class TimestepInjection(str, Enum):
    """How a [`ResBlock3D`][cpcbm_blocks.blocks.resblock.ResBlock3D] receives the timestep embedding."""

    ADD = "add"
    """Add a projection of the embedding after the first convolution (DDPM, MONAI)."""
    SCALE_SHIFT = "scale_shift"
    """Scale and shift the second GroupNorm's output, `norm(h) * (1 + s) + b` (guided-diffusion)."""


class FusionKind(str, Enum):
    """How a level's condition map enters the network's features (the fusion schedule).

    The condition map itself is always the gate-fused text and conditional-image features of that
    level ([`GatedFusion3D`][cpcbm_blocks.blocks.fusion_gated.GatedFusion3D]); this says how it is
    injected. Every kind is a zero-initialised residual, so a fresh fusion step is the identity.
    """

    NONE = "none"
    """No fusion at this level."""
    GATED = "gated"
    """Add a 1x1x1 projection of the condition map through a zero-initialised tanh gate."""
    DYNAMIC_CONV = "dynamic_conv"
    """Condition-routed dynamic convolution plus spatial FiLM (cheap enough for shallow levels)."""
    CROSS_ATTENTION = "cross_attention"
    """Voxels attend to text tokens and pooled conditional-image tokens (for deep levels)."""


def _store_int(record: Any, name: str, *, minimum: int) -> None:
    """Check a frozen record's whole-number field and store it back as an int (a NumPy integer would not
    serialise to JSON)."""
    value = check_int(f"{type(record).__name__}.{name}", getattr(record, name), minimum=minimum)
    object.__setattr__(record, name, value)


def check_channel_multiple(where: str, channels: int, *, of: int, of_name: str) -> None:
    """Raise [`SpecError`][cpcbm_blocks.errors.SpecError] unless `channels` is a multiple of `of`.

    Used by the spec and by the block constructors, so a block built on its own refuses, for
    example, 12 channels with 8 channels per head (which would otherwise silently run 1 head of 12).
    """
    if channels % of:
        raise fail(where, f"a multiple of {of_name}={of}", channels,
                    f"Use {_nearest_multiples(channels, of)} channels, or change {of_name}.")


def _nearest_multiples(value: int, multiple: int) -> str:
    below, above = (value // multiple) * multiple, (value // multiple + 1) * multiple
    return " or ".join(str(v) for v in (below, above) if v > 0)


@dataclass(frozen=True, kw_only=True)
class LevelSpec:
    """One resolution level of the UNet: its residual blocks, optional attention, and downsampling.

    On the way down a level runs `num_res_blocks` residual blocks (each followed by self-attention
    when `attention` is set), then a strided convolution by `stride`. On the way up it mirrors them.
    """

    channels: int
    """Channels of every feature map at this level."""
    num_res_blocks: int = 2
    """Residual blocks on the way down; the way up has as many skip-consuming blocks."""
    attention: bool = False
    """Interleave multi-head self-attention after every residual block of this level."""
    stride: Triple = (2, 2, 2)
    """Per-axis (depth, height, width) stride of the downsampling that ends this level."""
    kernel_size: Triple = (3, 3, 3)
    """Kernel of the convolutions at this level's resolution. `(1, 3, 3)` where depth is 1."""
    fusion: FusionKind = FusionKind.NONE
    """How the level's condition map is fused into the network, on the way down and on the way up."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusion", as_enum("LevelSpec.fusion", self.fusion, FusionKind))
        object.__setattr__(self, "stride", as_triple("LevelSpec.stride", self.stride))
        object.__setattr__(self, "kernel_size", as_triple("LevelSpec.kernel_size", self.kernel_size, odd=True))
        _store_int(self, "channels", minimum=1)
        _store_int(self, "num_res_blocks", minimum=1)
        check_bool("LevelSpec.attention", self.attention)


@dataclass(frozen=True, kw_only=True)
class MidSpec:
    """The bottleneck: `num_segments` segments of [res, attn, res] at the deepest level's channels."""

    num_segments: int = 2
    """How many [res, attn, res] segments run one after the other."""
    share_weights: bool = False
    """Reuse the first segment's modules for every segment (the original code did; off by default)."""
    attention: bool = True
    """Put self-attention between the two residual blocks of each segment."""
    kernel_size: Triple = (3, 3, 3)
    """Kernel of the mid convolutions; `(1, 3, 3)` when the bottleneck is 1 voxel deep."""
    fusion: FusionKind = FusionKind.NONE
    """How the bottleneck's condition map is fused, once per segment (after its attention)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusion", as_enum("MidSpec.fusion", self.fusion, FusionKind))
        object.__setattr__(self, "kernel_size", as_triple("MidSpec.kernel_size", self.kernel_size, odd=True))
        _store_int(self, "num_segments", minimum=1)
        for name in ("share_weights", "attention"):
            check_bool(f"MidSpec.{name}", getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class ConditioningSpec:
    """What the UNet is conditioned on, besides the timestep.

    Text arrives as tensors a pre-trained encoder (CLIP) produced ahead of time; the library never
    tokenises or downloads anything. Conditional images (a mask, a tumour map, another sequence) are
    co-registered with `x` and come with a per-sample availability flag per image.
    """

    text_channels: int | None = 512
    """Width E of the text token embeddings (CLIP ViT-B/32: 512, ViT-L/14: 768); None for no text."""
    image_channels: int = 3
    """Number k of conditional images (channels of `cond_images`); 0 for none."""
    num_null_text_tokens: int = 1
    """Learned tokens that stand in for absent text (appended to every context, masked in when absent)."""
    text_to_timestep: bool = False
    """Also scale-and-shift the timestep embedding with the pooled text (zero-initialised)."""
    dynamic_conv_experts: int = 4
    """Expert kernels K mixed per sample by dynamic-convolution fusion."""
    router_temperature: float = 1.0
    """Softmax temperature of the dynamic-convolution router (lower = sharper expert choice)."""
    pooled_image_tokens: Triple = (1, 4, 4)
    """Grid to which a level's image features are average-pooled into cross-attention tokens."""

    def __post_init__(self) -> None:
        if self.text_channels is not None:
            _store_int(self, "text_channels", minimum=1)
        _store_int(self, "image_channels", minimum=0)
        if self.text_channels is None and self.image_channels == 0:
            raise fail("ConditioningSpec", "text_channels or image_channels", "neither",
                        "Condition on text (text_channels=512), images (image_channels=3) or both; "
                        "or set UNetSpec.conditioning=None.")
        _store_int(self, "num_null_text_tokens", minimum=1)
        _store_int(self, "dynamic_conv_experts", minimum=1)
        check_bool("ConditioningSpec.text_to_timestep", self.text_to_timestep)
        if self.text_to_timestep and self.text_channels is None:
            raise fail("ConditioningSpec.text_to_timestep", "text (text_channels set)", "text_channels=None",
                        "Pooled text can only modulate the timestep embedding when there is text.")
        check_number("ConditioningSpec.router_temperature", self.router_temperature, above=0, fix="Use e.g. 1.0.")
        object.__setattr__(self, "pooled_image_tokens",
                           as_triple("ConditioningSpec.pooled_image_tokens", self.pooled_image_tokens))

    @property
    def has_text(self) -> bool:
        return self.text_channels is not None

    @property
    def has_images(self) -> bool:
        return self.image_channels > 0


@dataclass(frozen=True, kw_only=True)
class UNetSpec:
    """The whole 3D diffusion UNet, as data.

    Build the seed's topology with [`UNetSpec.default`][cpcbm_blocks.spec.UNetSpec.default], or write
    the levels yourself. Every field is validated here, so an invalid spec never reaches a module.
    """

    levels: tuple[LevelSpec, ...]
    """Resolution levels, shallowest first."""
    mid: MidSpec = field(default_factory=MidSpec)
    """The bottleneck between the down and up paths."""
    in_channels: int = 1
    """Channels of the noisy input volume `x`."""
    out_channels: int = 1
    """Channels of the prediction returned by the output head."""
    num_groups: int = 32
    """GroupNorm groups; every level's channels must be a multiple."""
    head_channels: int = 8
    """Channels per attention head (the seed uses 8: 32 heads at 256 channels)."""
    time_embedding_channels: int = 128
    """Width of the timestep embedding fed to every residual block."""
    timestep_injection: TimestepInjection = TimestepInjection.ADD
    """Additive (the seed's) or scale-and-shift timestep injection in the residual blocks."""
    dropout: float = 0.0
    """Dropout probability inside the residual blocks."""
    conditioning: ConditioningSpec | None = None
    """Text and conditional-image inputs; None for an unconditioned UNet (the seed's)."""
    upcast_attention: bool = False
    """Compute attention in float32 when the model runs in float16 (scores overflow past 65504 otherwise)."""

    def __post_init__(self) -> None:
        levels = self.levels
        if isinstance(levels, LevelSpec) or not isinstance(levels, Sequence):
            raise fail("UNetSpec.levels", "a sequence of LevelSpec", levels, "Wrap the levels in a tuple.")
        if len(levels) == 0:
            raise fail("UNetSpec.levels", "at least one level", "an empty sequence",
                        "Give at least one LevelSpec, e.g. UNetSpec.default().")
        for i, level in enumerate(levels):
            if not isinstance(level, LevelSpec):
                raise fail(f"UNetSpec.levels[{i}]", "a LevelSpec", level, "Build it with LevelSpec(...).")
        object.__setattr__(self, "levels", tuple(levels))
        if not isinstance(self.mid, MidSpec):
            raise fail("UNetSpec.mid", "a MidSpec", self.mid, "Build it with MidSpec(...).")
        object.__setattr__(self, "timestep_injection",
                           as_enum("UNetSpec.timestep_injection", self.timestep_injection, TimestepInjection))
        for name in ("in_channels", "out_channels", "num_groups", "head_channels", "time_embedding_channels"):
            _store_int(self, name, minimum=1)
        if self.levels[0].channels < 2:  # the timestep embedding's sinusoids: one channel has no cos/sin pair
            raise fail("UNetSpec.levels[0].channels", "at least 2 (the timestep embedding's sinusoidal features take "
                       "the first level's channels)", self.levels[0].channels,
                       "With 1 the embedding would not depend on t; use 2 or more.")
        check_bool("UNetSpec.upcast_attention", self.upcast_attention)
        check_number("UNetSpec.dropout", self.dropout, at_least=0, below=1, fix="Use e.g. 0.0 or 0.1.")
        for i, level in enumerate(self.levels):
            check_channel_multiple(f"UNetSpec.levels[{i}].channels", level.channels, of=self.num_groups,
                                   of_name="num_groups")
        if self.conditioning is not None and not isinstance(self.conditioning, ConditioningSpec):
            raise fail("UNetSpec.conditioning", "a ConditioningSpec or None", self.conditioning,
                        "Build it with ConditioningSpec(...).")
        self._check_fusion_schedule()
        for where, channels in self._attention_sites():
            if channels % self.head_channels:
                raise fail(where, f"channels divisible by head_channels={self.head_channels}", channels,
                            f"Use {_nearest_multiples(channels, self.head_channels)} channels, "
                            "or change head_channels.")

    def _fusion_sites(self) -> list[tuple[str, FusionKind, int]]:
        sites = [(f"UNetSpec.levels[{i}].fusion", lv.fusion, lv.channels) for i, lv in enumerate(self.levels)]
        return [*sites, ("UNetSpec.mid.fusion", self.mid.fusion, self.levels[-1].channels)]

    def _check_fusion_schedule(self) -> None:
        fused = [(where, kind) for where, kind, _ in self._fusion_sites() if kind is not FusionKind.NONE]
        if self.conditioning is None:
            if fused:
                where, kind = fused[0]
                raise fail(where, "'none' when UNetSpec.conditioning is None", kind.value,
                            "Give the spec a ConditioningSpec (e.g. UNetSpec.conditioned()), or drop the fusion.")
            return
        if not fused and not self.conditioning.text_to_timestep:
            raise fail("UNetSpec fusion schedule", "at least one level or the middle with a fusion kind",
                        "'none' everywhere", "Set LevelSpec.fusion / MidSpec.fusion, or set conditioning=None.")
        for where, kind in fused:
            if kind is FusionKind.CROSS_ATTENTION and not self.conditioning.has_text:
                raise fail(where, "text to attend to (conditioning.text_channels set) for 'cross_attention'",
                            "text_channels=None", "Use 'dynamic_conv' or 'gated' for image-only conditioning.")

    def _attention_sites(self) -> list[tuple[str, int]]:
        sites = [(f"UNetSpec.levels[{i}].channels (attention=True)", lv.channels)
                 for i, lv in enumerate(self.levels) if lv.attention]
        if self.mid.attention:
            sites.append(("UNetSpec.mid (attention=True) at levels[-1].channels", self.levels[-1].channels))
        sites += [(f"{where} = 'cross_attention' at {channels} channels", channels)
                  for where, kind, channels in self._fusion_sites() if kind is FusionKind.CROSS_ATTENTION]
        return sites

    @property
    def base_channels(self) -> int:
        """Channels after `conv_in`: those of the first level."""
        return self.levels[0].channels

    @property
    def stride_product(self) -> Triple:
        """Per-axis product of all downsampling strides: D, H and W must be multiples of it."""
        product = [1, 1, 1]
        for level in self.levels:
            product = [p * s for p, s in zip(product, level.stride)]
        return (product[0], product[1], product[2])

    @classmethod
    def default(
        cls,
        *,
        sample_size: Sequence[int] = (8, 256, 256),
        channels: Sequence[int] = (32, 64, 128, 256),
        attention_levels: Sequence[int] | None = None,
        num_res_blocks: int = 2,
        planar_kernels_where_depth_is_one: bool = True,
        **overrides: Any,
    ) -> "UNetSpec":
        """The seed's UNet (`CPC_BM_model.md`), with strides derived for a nominal `sample_size`.

        Strides: on every axis, halve while the size at that level is larger than 1 (nnU-Net's rule),
        so `(8, 256, 256)` gives `(2,2,2), (2,2,2), (2,2,2), (1,2,2)`: depth 8 -> 4 -> 2 -> 1, then
        only height and width are halved.

        Kernels: where a level's depth is 1 (level 4 and the middle at the nominal size), a 3x3x3
        convolution with zero padding multiplies padding for two thirds of its taps. With
        `planar_kernels_where_depth_is_one` (the default) those levels use `(1, 3, 3)` kernels, which
        compute exactly the same function on a 1-deep volume with a third of the weights and FLOPs.

        **Arguments:**

        - `sample_size`: nominal (depth, height, width) of a training sample.
        - `channels`: channels per level, shallowest first.
        - `attention_levels`: 1-based levels that interleave self-attention; default: the deepest
          (level 4 for the seed's four levels).
        - `num_res_blocks`: residual blocks per level on the way down.
        - `planar_kernels_where_depth_is_one`: use `(1, 3, 3)` kernels where depth is 1.
        - `overrides`: any other [`UNetSpec`][cpcbm_blocks.spec.UNetSpec] field (e.g. `out_channels=2`).
        """
        field_names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - field_names)
        if unknown:
            own = [name for name in inspect.signature(cls.default).parameters if name != "overrides"]
            raise fail("UNetSpec.default(...)", f"its own arguments ({', '.join(own)}) or UNetSpec fields "
                        f"({', '.join(sorted(field_names))})", unknown,
                        "Check the spelling; the channels of every level are set with channels=(...).")
        size = list(as_triple("UNetSpec.default(sample_size=...)", sample_size))
        channels = as_ints("UNetSpec.default(channels=...)", channels, minimum=1)
        attention_levels = as_level_numbers("UNetSpec.default(attention_levels=...)",
                                            (len(channels),) if attention_levels is None else attention_levels,
                                            levels=len(channels))
        check_bool("UNetSpec.default(planar_kernels_where_depth_is_one=...)", planar_kernels_where_depth_is_one)

        def kernel_for(depth: int) -> Triple:
            return (1, 3, 3) if planar_kernels_where_depth_is_one and depth == 1 else (3, 3, 3)

        levels = []
        for number, level_channels in enumerate(channels, start=1):
            stride = tuple(2 if s > 1 else 1 for s in size)
            levels.append(LevelSpec(channels=level_channels, num_res_blocks=num_res_blocks,
                                    attention=number in attention_levels, stride=stride,
                                    kernel_size=kernel_for(size[0])))
            for axis in range(3):
                if size[axis] % stride[axis]:
                    raise fail("UNetSpec.default(sample_size=...)", f"sizes that halve evenly through {len(channels)} levels",
                                tuple(sample_size), "Use powers of two, e.g. (8, 256, 256).")
                size[axis] //= stride[axis]
        fields = {"levels": tuple(levels), "mid": MidSpec(kernel_size=kernel_for(size[0]))}
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def conditioned(
        cls,
        *,
        text_channels: int | None = 512,
        image_channels: int = 3,
        dynamic_conv_levels: Sequence[int] | None = None,
        cross_attention_levels: Sequence[int] | None = None,
        mid_fusion: FusionKind = FusionKind.CROSS_ATTENTION,
        text_to_timestep: bool = False,
        **default_arguments: Any,
    ) -> "UNetSpec":
        """The seed's conditioned UNet: the default topology plus the fusion schedule of its notes.

        Text (CLIP ViT-B/32 width 512 unless told otherwise) and 3 conditional images are fused per
        level by a gate, then enter the network by dynamic convolution at the shallow levels (1-2) and
        by cross-attention at the deep levels (3-4) and the middle. The fusion steps only add
        shape-preserving transitions: removing them gives back the seed's `h:` trace.

        **Arguments:**

        - `text_channels`, `image_channels`, `text_to_timestep`: see
          [`ConditioningSpec`][cpcbm_blocks.spec.ConditioningSpec].
        - `dynamic_conv_levels`, `cross_attention_levels`: 1-based levels for each fusion kind; by
          default the shallow half of the levels and the deep half ((1, 2) and (3, 4) for four).
        - `mid_fusion`: fusion kind of the middle segments.
        - `default_arguments`: passed to [`UNetSpec.default`][cpcbm_blocks.spec.UNetSpec.default]
          (e.g. `sample_size`, `channels`), including `conditioning=ConditioningSpec(...)` to override
          the other conditioning fields.
        """
        conditioning = default_arguments.pop("conditioning", None) or ConditioningSpec(
            text_channels=text_channels, image_channels=image_channels, text_to_timestep=text_to_timestep)
        base = cls.default(**default_arguments)
        half = len(base.levels) // 2
        if dynamic_conv_levels is None:
            dynamic_conv_levels = tuple(range(1, half + 1))
        if cross_attention_levels is None:
            cross_attention_levels = tuple(range(half + 1, len(base.levels) + 1))
        dynamic_conv_levels = as_level_numbers("UNetSpec.conditioned(dynamic_conv_levels=...)", dynamic_conv_levels,
                                               levels=len(base.levels))
        cross_attention_levels = as_level_numbers("UNetSpec.conditioned(cross_attention_levels=...)",
                                                  cross_attention_levels, levels=len(base.levels))
        overlap = set(dynamic_conv_levels) & set(cross_attention_levels)
        if overlap:
            raise fail("UNetSpec.conditioned(...)", "disjoint dynamic_conv_levels and cross_attention_levels",
                        sorted(overlap), "Give each level one fusion kind.")

        def kind(number: int) -> FusionKind:
            if number in dynamic_conv_levels:
                return FusionKind.DYNAMIC_CONV
            return FusionKind.CROSS_ATTENTION if number in cross_attention_levels else FusionKind.NONE

        levels = tuple(dataclasses.replace(level, fusion=kind(n)) for n, level in enumerate(base.levels, start=1))
        mid = dataclasses.replace(base.mid, fusion=as_enum("UNetSpec.conditioned(mid_fusion=...)", mid_fusion,
                                                           FusionKind))
        return dataclasses.replace(base, levels=levels, mid=mid, conditioning=conditioning)

    @property
    def is_conditioned(self) -> bool:
        """True when the spec takes text and/or conditional images."""
        return self.conditioning is not None

    # ---- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain-JSON dict of every field, with `format_version`."""
        data = json.loads(json.dumps(dataclasses.asdict(self), default=lambda v: v.value))  # enums -> values
        return {"format_version": FORMAT_VERSION, **data}

    def to_json(self, *, indent: int | None = 2) -> str:
        """Serialise to JSON text; [`from_json`][cpcbm_blocks.spec.UNetSpec.from_json] gives it back."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetSpec":
        """Rebuild a spec from [`to_dict`][cpcbm_blocks.spec.UNetSpec.to_dict] output; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise fail("spec", "a JSON object", type(data).__name__, "Pass the output of UNetSpec.to_dict().")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise fail("spec.format_version", str(FORMAT_VERSION), version,
                        "This file was written by another version of cpcbm_blocks.")
        _reject_unknown("spec", data, cls)
        levels = data.get("levels")
        if not isinstance(levels, Sequence) or isinstance(levels, (str, bytes)):
            raise fail("spec.levels", "a list of level objects", levels, "Each level is an object of LevelSpec fields.")
        parsed_levels = []
        for i, level in enumerate(levels):
            if not isinstance(level, Mapping):
                raise fail(f"spec.levels[{i}]", "an object", level, "Each level is an object of LevelSpec fields.")
            _reject_unknown(f"spec.levels[{i}]", level, LevelSpec)
            parsed_levels.append(LevelSpec(**level))
        data["levels"] = tuple(parsed_levels)
        if "mid" in data:
            if not isinstance(data["mid"], Mapping):
                raise fail("spec.mid", "an object", data["mid"], "Give an object of MidSpec fields.")
            _reject_unknown("spec.mid", data["mid"], MidSpec)
            data["mid"] = MidSpec(**data["mid"])
        if data.get("conditioning") is not None:
            if not isinstance(data["conditioning"], Mapping):
                raise fail("spec.conditioning", "an object or null", data["conditioning"],
                            "Give an object of ConditioningSpec fields.")
            _reject_unknown("spec.conditioning", data["conditioning"], ConditioningSpec)
            data["conditioning"] = ConditioningSpec(**data["conditioning"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "UNetSpec":
        """Parse JSON text written by [`to_json`][cpcbm_blocks.spec.UNetSpec.to_json]."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"spec: expected JSON text, got invalid JSON ({error}). Check the file.") from None
        return cls.from_dict(data)


def _reject_unknown(where: str, data: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise fail(where, f"only the fields {sorted(known)}", unknown, "Remove or rename the unknown keys.")
