"""The bad-input catalogue: every mistake a user can make, the error it raises, and its message.

Each row of `CATALOGUE` is one distinct bad input, bad spec or bad checkpoint. The test checks the
exception type, and that the message names the argument, the expected value, the actual value and
what to do. For a forward pass it also checks that the error came before any compute (no module of
the UNet ran).

`docs/errors.md` ("Errors you may see and what to do") is generated from this table, with the real
messages, and a test keeps it in sync. After changing a row or a message, regenerate it with

    python -m tests.test_error_catalogue
"""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cpcbm_blocks import (
    CheckpointError,
    CondImageEncoder3D,
    Conv3d,
    Downsample3D,
    DynamicConvFusion3D,
    InputError,
    LevelSpec,
    MidSpec,
    MultiHeadSelfAttention3D,
    ResBlock3D,
    ShapeContractError,
    SpecError,
    TimestepEmbedding,
    UNet3D,
    UNetSpec,
    set_shape_checks,
    set_weight_grad_method,
)
from cpcbm_blocks.blocks.conv_by_taps import conv3d_by_taps
from cpcbm_blocks.checkpoint import WEIGHTS_FILE, from_pretrained, load_weights, save_pretrained
from cpcbm_blocks.memory import memory_plan
from cpcbm_blocks.plan import plan
from cpcbm_blocks.spec import ConditioningSpec

from .test_conditioning import inputs, small_conditioned

ROOT = Path(__file__).resolve().parents[1]
ERRORS_PAGE = ROOT / "docs" / "errors.md"


def tiny_spec(**changes: Any) -> UNetSpec:
    """The catalogue's model: 2 levels, stride product (2, 4, 4), 1 input channel, 4 groups."""
    fields = dict(levels=(LevelSpec(channels=8, stride=(2, 2, 2)),
                          LevelSpec(channels=16, attention=True, stride=(1, 2, 2), kernel_size=(1, 3, 3))),
                  mid=MidSpec(kernel_size=(1, 3, 3)), num_groups=4, head_channels=4, time_embedding_channels=16)
    return UNetSpec(**{**fields, **changes})


@dataclass
class Context:
    """What the triggers act on: a small UNet, a checkpoint of it, and a scratch directory."""

    model: UNet3D
    conditioned: UNet3D
    checkpoint: Path
    scratch: Path
    empty: Path

    @classmethod
    def create(cls, directory: Path) -> "Context":
        torch.manual_seed(0)
        model = UNet3D(tiny_spec())
        checkpoint = save_pretrained(model, directory / "ckpt")
        scratch, empty = directory / "scratch", directory / "empty"
        scratch.mkdir()
        empty.mkdir()
        conditioned = UNet3D(small_conditioned())
        return cls(model=model, conditioned=conditioned, checkpoint=checkpoint, scratch=scratch, empty=empty)

    def forward(self, x: Any, t: Any = 500, **kwargs: Any) -> Any:
        return self.model(x, t, **kwargs)

    def conditioned_forward(self, batch: int = 2, **changes: Any) -> Any:
        """The conditioned UNet (text width 12, 3 images, x of shape (2, 1, 4, 16, 16)) with some conditions changed."""
        return self.conditioned(torch.zeros(batch, 1, 4, 16, 16), 500, **{**inputs(batch=2), **changes})

    def x(self, *shape: int, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(shape or (2, 1, 4, 8, 8), **kwargs)

    def damaged_checkpoint(self, damage: Callable[[Path], Any]) -> Path:
        copy = self.scratch / "damaged"
        save_pretrained(self.model, copy)
        damage(copy)
        return copy


@dataclass(frozen=True)
class Case:
    """One catalogue row. `argument`, `expected`, `actual` and `fix` must all appear in the message."""

    id: str
    topic: str
    mistake: str
    trigger: Callable[[Context], Any]
    error: type
    argument: str
    expected: str
    actual: str
    fix: str
    forward: bool = False
    """The trigger is a UNet forward: the error must come before any module runs."""
    conditioned: bool = False
    """The trigger runs the conditioned UNet (checked for compute too)."""


def _spec_case(id, mistake, build, argument, expected, actual, fix):
    return Case(id=id, topic="spec", mistake=mistake, trigger=lambda ctx: build(), error=SpecError,
                argument=argument, expected=expected, actual=actual, fix=fix)


def _x_case(id, mistake, x, argument, expected, actual, fix, *, error=InputError, t=500):
    return Case(id=id, topic="x", mistake=mistake, trigger=lambda ctx: ctx.forward(x(ctx), t), error=error,
                argument=argument, expected=expected, actual=actual, fix=fix, forward=True)


def _t_case(id, mistake, t, argument, expected, actual, fix):
    return Case(id=id, topic="t", mistake=mistake, trigger=lambda ctx: ctx.forward(ctx.x(), t(ctx)), error=InputError,
                argument=argument, expected=expected, actual=actual, fix=fix, forward=True)


def _cond_case(id, mistake, changes, argument, expected, actual, fix, *, batch=2):
    return Case(id=id, topic="conditions", mistake=mistake,
                trigger=lambda ctx: ctx.conditioned_forward(batch, **changes()), error=InputError,
                argument=argument, expected=expected, actual=actual, fix=fix, forward=True, conditioned=True)


def _encoded(batch: int):
    """Conditions encoded by another UNet of the same spec, so that encoding is not counted as the call's compute."""
    return UNet3D(small_conditioned()).encode_conditions(**inputs(batch=batch))


def _both_kinds_of_conditions(ctx: Context) -> Any:
    encoded = _encoded(2)
    return ctx.conditioned(torch.zeros(2, 1, 4, 16, 16), 5, conditions=encoded, text=inputs(batch=2)["text"])


def _encoded_for_another_batch(ctx: Context) -> Any:
    encoded = _encoded(2)
    return ctx.conditioned(torch.zeros(3, 1, 4, 16, 16), 5, conditions=encoded)


def _group_norm_degenerate(ctx: Context) -> Any:
    # One channel per GroupNorm group and a 1x1x1 volume after the only downsampling.
    spec = UNetSpec(levels=(LevelSpec(channels=4, stride=(1, 2, 2)),), num_groups=4, head_channels=4)
    return UNet3D(spec)(torch.zeros(1, 1, 1, 2, 2), 3)


CATALOGUE: list[Case] = [
    # ---- the volume x ------------------------------------------------------------------------
    _x_case("x-rank-4", "A single volume without the batch axis (Conv3d would silently treat the channels as batch)",
            lambda ctx: ctx.x(1, 4, 8, 8), "x", "expected 5 dimensions", "got 4", "x.unsqueeze(0)"),
    _x_case("x-rank-3", "A bare (depth, height, width) array", lambda ctx: ctx.x(4, 8, 8),
            "x", "expected 5 dimensions", "got 3", "x[None, None]"),
    _x_case("x-rank-6", "An extra axis, e.g. a stack of batches", lambda ctx: ctx.x(1, 2, 1, 4, 8, 8),
            "x", "expected 5 dimensions", "got 6", "Reshape it"),
    _x_case("x-channels", "Two sequences stacked on the channel axis of a 1-channel spec", lambda ctx: ctx.x(2, 2, 4, 8, 8),
            "x", "expected 1 channel(s)", "got 2", "change UNetSpec.in_channels"),
    _x_case("x-channels-last", "Channels last instead of first", lambda ctx: ctx.x(2, 4, 8, 8, 1),
            "x", "expected 1 channel(s)", "got 4", "Pass a volume with 1 channel(s)"),
    _x_case("x-int-dtype", "Integer intensities straight from the DICOM/NIfTI reader",
            lambda ctx: ctx.x(dtype=torch.int16), "x", "expected a floating-point tensor", "torch.int16", "x.float()"),
    _x_case("x-bool-dtype", "A boolean mask given as the volume", lambda ctx: ctx.x(dtype=torch.bool),
            "x", "expected a floating-point tensor", "torch.bool", "x.float()"),
    _x_case("x-complex-dtype", "A complex (k-space) volume", lambda ctx: ctx.x(dtype=torch.complex64),
            "x", "expected a floating-point tensor", "torch.complex64", "x.float()"),
    _x_case("x-float64", "A float64 volume for a float32 model (numpy's default dtype)",
            lambda ctx: ctx.x(dtype=torch.float64), "x", "expected dtype torch.float32", "got torch.float64",
            "x.to(torch.float32)"),
    _x_case("x-bf16-no-autocast", "A bfloat16 volume for a float32 model, outside torch.autocast",
            lambda ctx: ctx.x(dtype=torch.bfloat16), "x", "expected dtype torch.float32", "got torch.bfloat16",
            "run under torch.autocast"),
    _x_case("x-device", "A volume on another device than the model", lambda ctx: ctx.x(device="meta"),
            "x", "expected a tensor on the model's device cpu", "got one on meta", "x.to('cpu')"),
    _x_case("x-depth-stride", "Depth not a multiple of the product of the depth strides", lambda ctx: ctx.x(2, 1, 3, 8, 8),
            "x", "depth to be a multiple of 2", "got depth 3", "Use depth 2 or 4"),
    _x_case("x-height-stride", "Height not a multiple of the product of the height strides",
            lambda ctx: ctx.x(2, 1, 4, 10, 8), "x", "height to be a multiple of 4", "got height 10", "Use height 8 or 12"),
    _x_case("x-width-stride", "Width smaller than the product of the width strides", lambda ctx: ctx.x(2, 1, 4, 8, 2),
            "x", "width to be a multiple of 4", "got width 2", "Use width 4"),
    _x_case("x-empty-batch", "An empty batch", lambda ctx: ctx.x(0, 1, 4, 8, 8),
            "x", "expected every axis to be non-empty", "batch = 0", "at least one sample"),
    _x_case("x-empty-depth", "A volume with no slices", lambda ctx: ctx.x(2, 1, 0, 8, 8),
            "x", "expected every axis to be non-empty", "depth = 0", "at least one sample and one voxel"),
    _x_case("x-not-a-tensor", "A nested list instead of a tensor", lambda ctx: [[0.0]],
            "x", "expected a torch.Tensor", "got list", "torch.as_tensor"),
    _x_case("x-numpy", "A numpy array instead of a tensor", lambda ctx: np.zeros((2, 1, 4, 8, 8), dtype=np.float32),
            "x", "expected a torch.Tensor", "got ndarray", "torch.as_tensor"),
    Case(id="x-groupnorm-single-value", topic="x",
         mistake="A volume so small that a GroupNorm group holds one value (one channel per group on a 1x1x1 map)",
         trigger=_group_norm_degenerate, error=InputError, argument="x",
         expected="every GroupNorm group to hold at least 2 values", actual="got 1 value per group", fix="Use a larger volume"),
    # ---- the timesteps t ---------------------------------------------------------------------
    _t_case("t-batch-mismatch", "One timestep per sample, but for another batch size",
            lambda ctx: torch.tensor([1.0, 2.0, 3.0]), "t", "expected shape () or (2,)", "got (3,)", "one timestep per sample"),
    _t_case("t-batch-one", "A (1,) tensor of timesteps for a batch of 2", lambda ctx: torch.tensor([5]),
            "t", "expected shape () or (2,)", "got (1,)", "a single scalar for the whole batch"),
    _t_case("t-column", "Timesteps as a (B, 1) column", lambda ctx: torch.zeros(2, 1),
            "t", "expected shape () or (2,)", "got (2, 1)", "one timestep per sample"),
    _t_case("t-negative-int", "A negative timestep", lambda ctx: -1,
            "t", "expected finite, non-negative timesteps", "got -1", "timestep range"),
    _t_case("t-negative-tensor", "A negative timestep in a per-sample tensor", lambda ctx: torch.tensor([3.0, -2.0]),
            "t", "expected finite, non-negative timesteps", "-2.0", "timestep range"),
    _t_case("t-nan", "A NaN timestep (e.g. 0/0 in a continuous-time schedule)", lambda ctx: torch.tensor([1.0, float("nan")]),
            "t", "expected finite, non-negative timesteps", "nan", "timestep range"),
    _t_case("t-inf", "An infinite timestep", lambda ctx: float("inf"),
            "t", "expected finite, non-negative timesteps", "inf", "timestep range"),
    _t_case("t-bool-tensor", "A boolean tensor as timesteps", lambda ctx: torch.tensor([True, False]),
            "t", "expected an integer or floating-point tensor", "torch.bool", "t.float()"),
    _t_case("t-complex", "A complex tensor as timesteps", lambda ctx: torch.tensor([1 + 0j, 2 + 0j]),
            "t", "expected an integer or floating-point tensor", "torch.complex64", "t.float()"),
    _t_case("t-python-bool", "A Python bool as the timestep", lambda ctx: True,
            "t", "expected a number, a 0-d tensor or a (2,) tensor", "got bool", "t=500"),
    _t_case("t-string", "A string as the timestep", lambda ctx: "500",
            "t", "expected a number, a 0-d tensor or a (2,) tensor", "got str", "t=500"),
    _t_case("t-list", "A list of timesteps instead of a tensor", lambda ctx: [1, 2],
            "t", "expected a number, a 0-d tensor or a (2,) tensor", "got list", "torch.full((2,), 500)"),
    _t_case("t-meta", "Timesteps without values (a meta tensor) for a real volume",
            lambda ctx: torch.zeros(2, device="meta"), "t", "expected timesteps with values", "meta device",
            "scheduler's real timesteps"),
    # ---- conditions (text tokens, conditional images) ----------------------------------------
    _cond_case("cond-batch-vs-x", "Conditions for 3 samples with a batch of 2 volumes",
               lambda: {**inputs(batch=3)}, "text", "the batch size of x (2)", "conditions for 3 sample(s)",
               "one row of conditions per sample"),
    _cond_case("cond-text-vs-images-batch", "Text for 3 samples, images for 2",
               lambda: dict(text=torch.randn(3, 5, 12), text_mask=torch.ones(3, 5, dtype=torch.bool)),
               "text, cond_images", "the same batch size", "{'text': 3, 'cond_images': 2}", "one row per sample"),
    _cond_case("cond-text-width", "Text tokens from another encoder (width 13 for a spec of 12)",
               lambda: dict(text=torch.randn(2, 5, 13)), "text", "token width 12", "got 13",
               "ConditioningSpec(text_channels=...)"),
    _cond_case("cond-text-rank", "Pooled text (B, E) passed as the token sequence", lambda: dict(text=torch.randn(2, 12)),
               "text", "3 dimensions (batch, tokens, text_channels)", "got 2", "Pass a tensor of shape (batch, tokens, text_channels)"),
    _cond_case("cond-text-int", "Token ids instead of token embeddings",
               lambda: dict(text=torch.ones(2, 5, 12, dtype=torch.int64)), "text", "floating-point tensor",
               "torch.int64", ".float()"),
    _cond_case("cond-text-float64", "Float64 text embeddings for a float32 model",
               lambda: dict(text=torch.randn(2, 5, 12, dtype=torch.float64)), "text", "dtype torch.float32",
               "got torch.float64", "text.to(torch.float32)"),
    _cond_case("cond-text-empty", "An empty token sequence for absent text",
               lambda: dict(text=torch.randn(2, 0, 12), text_mask=torch.ones(2, 0, dtype=torch.bool)),
               "text", "at least one token", "(2, 0, 12)", "all-False text_mask row"),
    _cond_case("cond-text-mask-shape", "A text mask for another number of tokens",
               lambda: dict(text_mask=torch.ones(2, 4, dtype=torch.bool)), "text_mask", "shape (2, 5)", "got (2, 4)",
               "one entry per token of text"),
    _cond_case("cond-text-mask-dtype", "A float (attention-bias style) text mask", lambda: dict(text_mask=torch.ones(2, 5)),
               "text_mask", "a bool tensor", "torch.float32", ".bool()"),
    _cond_case("cond-text-pooled-shape", "A pooled text vector of the wrong width",
               lambda: dict(text_pooled=torch.randn(2, 14)), "text_pooled", "shape (2, 12)", "got (2, 14)",
               "leave it None"),
    _cond_case("cond-images-channels", "Two conditional images for a spec of three",
               lambda: dict(cond_images=torch.randn(2, 2, 4, 16, 16), cond_available=torch.ones(2, 2, dtype=torch.bool)),
               "cond_images", "3 conditional image(s)", "got 2", "conditioning.image_channels"),
    _cond_case("cond-images-size", "Conditional images on another grid than x",
               lambda: dict(cond_images=torch.randn(2, 3, 4, 32, 32)), "cond_images",
               "depth, height and width (4, 16, 16)", "got (4, 32, 32)", "x's grid"),
    _cond_case("cond-images-not-tensor", "Conditional images as a list", lambda: dict(cond_images=[0.0]),
               "cond_images", "a torch.Tensor", "got list", "torch.as_tensor"),
    _cond_case("cond-images-int", "Integer label maps as conditional images",
               lambda: dict(cond_images=torch.ones(2, 3, 4, 16, 16, dtype=torch.int32)), "cond_images",
               "floating-point tensor", "torch.int32", ".float()"),
    _cond_case("cond-images-device", "Conditional images on another device than the model",
               lambda: dict(cond_images=torch.zeros(2, 3, 4, 16, 16, device="meta")), "cond_images",
               "the model's device cpu", "got one on meta", "cond_images.to('cpu')"),
    _cond_case("cond-available-shape", "Availability flags for another number of images",
               lambda: dict(cond_available=torch.ones(2, 2, dtype=torch.bool)), "cond_available", "shape (2, 3)",
               "got (2, 2)", "one flag per conditional image"),
    _cond_case("cond-available-dtype", "Availability given as 0/1 floats", lambda: dict(cond_available=torch.ones(2, 3)),
               "cond_available", "a bool tensor", "torch.float32", ".bool()"),
    _cond_case("cond-missing-text", "No text for a spec that conditions on text", lambda: dict(text=None, text_mask=None),
               "text", "token embeddings (B, L, 12)", "got None", "all-False text_mask row"),
    _cond_case("cond-missing-images", "No conditional images for a spec that conditions on images",
               lambda: dict(cond_images=None, cond_available=None), "cond_images", "(B, 3, D, H, W) images",
               "got None", "cond_available=False"),
    Case(id="cond-text-to-plain-unet", topic="conditions", mistake="Text given to a UNet whose spec has no conditioning",
         trigger=lambda ctx: ctx.forward(ctx.x(), 5, text=torch.randn(2, 5, 12)), error=InputError, argument="text",
         expected="None because this UNet's spec has no conditioning", actual="got a value", fix="UNetSpec.conditioned", forward=True),
    Case(id="cond-images-to-plain-unet", topic="conditions",
         mistake="Conditional images given to a UNet whose spec has no conditioning",
         trigger=lambda ctx: ctx.forward(ctx.x(), 5, cond_images=torch.randn(2, 3, 4, 8, 8)), error=InputError,
         argument="cond_images", expected="None because this UNet's spec has no conditioning", actual="got a value",
         fix="UNetSpec.conditioned", forward=True),
    Case(id="cond-encoded-to-plain-unet", topic="conditions",
         mistake="Encoded conditions given to a UNet whose spec has no conditioning",
         trigger=lambda ctx: ctx.forward(ctx.x(), 5, conditions=ctx.conditioned.encode_conditions(**inputs(batch=2))),
         error=InputError, argument="conditions", expected="None because this UNet's spec has no conditioning",
         actual="got EncodedConditions", fix="Drop conditions=", forward=True),
    Case(id="cond-raw-and-encoded", topic="conditions", mistake="Raw and encoded conditions in the same call",
         trigger=_both_kinds_of_conditions, error=InputError, argument="text", expected="either raw conditions or conditions=",
         actual="got both", fix="Pass one or the other", forward=True, conditioned=True),
    Case(id="cond-encoded-batch", topic="conditions", mistake="Conditions encoded for 2 samples reused for a batch of 3",
         trigger=_encoded_for_another_batch, error=InputError, argument="conditions",
         expected="the batch size of x (3)", actual="conditions for 2 sample(s)", fix="one row of conditions per sample",
         forward=True, conditioned=True),
    # ---- the spec ----------------------------------------------------------------------------
    _spec_case("spec-empty-levels", "No levels", lambda: UNetSpec(levels=()),
               "UNetSpec.levels", "at least one level", "an empty sequence", "UNetSpec.default()"),
    _spec_case("spec-levels-not-sequence", "A single LevelSpec instead of a tuple of them",
               lambda: UNetSpec(levels=LevelSpec(channels=32)), "UNetSpec.levels", "a sequence of LevelSpec",
               "LevelSpec(channels=32", "Wrap the levels in a tuple"),
    _spec_case("spec-level-not-levelspec", "A dict instead of a LevelSpec", lambda: UNetSpec(levels=({"channels": 32},)),
               "UNetSpec.levels[0]", "a LevelSpec", "{'channels': 32}", "LevelSpec(...)"),
    _spec_case("spec-groups-divide-channels", "Channels not a multiple of the GroupNorm groups",
               lambda: UNetSpec(levels=(LevelSpec(channels=48),)), "UNetSpec.levels[0].channels",
               "a multiple of num_groups=32", "48", "Use 32 or 64 channels"),
    _spec_case("spec-groups-zero", "Zero GroupNorm groups", lambda: tiny_spec(num_groups=0),
               "UNetSpec.num_groups", "an int >= 1", "0", "at least 1"),
    _spec_case("spec-heads-divide-channels", "Attention channels not divisible by the channels per head",
               lambda: tiny_spec(head_channels=6), "UNetSpec.levels[1].channels (attention=True)",
               "divisible by head_channels=6", "16", "Use 12 or 18 channels"),
    _spec_case("spec-heads-mid", "Middle attention channels not divisible by the channels per head",
               lambda: UNetSpec(levels=(LevelSpec(channels=40),), num_groups=8, head_channels=16),
               "UNetSpec.mid (attention=True)", "divisible by head_channels=16", "40", "change head_channels"),
    _spec_case("spec-stride-length", "A 2-D stride", lambda: LevelSpec(channels=32, stride=(2, 2)),
               "LevelSpec.stride", "a (depth, height, width) triple", "(2, 2)", "one value per axis"),
    _spec_case("spec-stride-zero", "A zero stride", lambda: LevelSpec(channels=32, stride=(2, 0, 2)),
               "LevelSpec.stride (height)", "an int >= 1", "0", "at least 1"),
    _spec_case("spec-stride-float", "A fractional stride", lambda: LevelSpec(channels=32, stride=(2, 2.5, 2)),
               "LevelSpec.stride (height)", "an int >= 1", "2.5", "whole number"),
    _spec_case("spec-kernel-even", "An even kernel size", lambda: LevelSpec(channels=32, kernel_size=(2, 3, 3)),
               "LevelSpec.kernel_size (depth)", "an odd kernel size", "2", "use an odd one"),
    _spec_case("spec-channels-zero", "A level with no channels", lambda: LevelSpec(channels=0),
               "LevelSpec.channels", "an int >= 1", "0", "at least 1"),
    _spec_case("spec-res-blocks-zero", "A level with no residual blocks", lambda: LevelSpec(channels=32, num_res_blocks=0),
               "LevelSpec.num_res_blocks", "an int >= 1", "0", "at least 1"),
    _spec_case("spec-attention-not-bool", "A string for a boolean flag", lambda: LevelSpec(channels=32, attention="yes"),
               "LevelSpec.attention", "a bool", "'yes'", "True or False"),
    _spec_case("spec-mid-segments-zero", "A middle with no segments", lambda: MidSpec(num_segments=0),
               "MidSpec.num_segments", "an int >= 1", "0", "at least 1"),
    _spec_case("spec-dropout", "A dropout probability of 1 or more", lambda: tiny_spec(dropout=1.5),
               "UNetSpec.dropout", "a number >= 0 and < 1", "1.5", "0.1"),
    _spec_case("spec-timestep-injection", "An unknown timestep-injection kind", lambda: tiny_spec(timestep_injection="film"),
               "UNetSpec.timestep_injection", "one of 'add', 'scale_shift'", "'film'", "Pick one of the listed values"),
    _spec_case("spec-default-attention-level", "An attention level beyond the last level",
               lambda: UNetSpec.default(attention_levels=(5,)), "UNetSpec.default(attention_levels=...)",
               "1-based level numbers in 1..4", "(5,)", "numbered from 1"),
    _spec_case("spec-default-sample-size", "A sample size that does not halve evenly",
               lambda: UNetSpec.default(sample_size=(8, 100, 100)), "UNetSpec.default(sample_size=...)",
               "sizes that halve evenly", "(8, 100, 100)", "powers of two"),
    _spec_case("spec-json-unknown-key", "A misspelt field in a spec file",
               lambda: UNetSpec.from_json('{"levels": [{"channels": 32, "chanels": 3}]}'), "spec.levels[0]",
               "only the fields", "['chanels']", "Remove or rename"),
    _spec_case("spec-json-version", "A spec file from another format version",
               lambda: UNetSpec.from_json('{"levels": [], "format_version": 99}'), "spec.format_version", "expected 1",
               "99", "another version of cpcbm_blocks"),
    _spec_case("spec-json-invalid", "A spec file that is not JSON", lambda: UNetSpec.from_json("{not json"),
               "spec", "expected JSON text", "invalid JSON", "Check the file"),
    _spec_case("spec-fusion-kind", "An unknown fusion kind",
               lambda: small_conditioned().__class__(**{**small_conditioned().__dict__,
                                                        "mid": MidSpec(fusion="attention", kernel_size=(1, 3, 3))}),
               "MidSpec.fusion", "one of 'none', 'gated', 'dynamic_conv', 'cross_attention'", "'attention'",
               "Pick one of the listed values"),
    _spec_case("spec-fusion-without-conditioning", "A fusion step in a spec without conditioning",
               lambda: tiny_spec(levels=(LevelSpec(channels=8, fusion="gated"),)), "UNetSpec.levels[0].fusion",
               "'none' when UNetSpec.conditioning is None", "'gated'", "or drop the fusion"),
    _spec_case("spec-conditioning-empty", "Conditioning on neither text nor images",
               lambda: ConditioningSpec(text_channels=None, image_channels=0), "ConditioningSpec",
               "text_channels or image_channels", "'neither'", "UNetSpec.conditioning=None"),
    _spec_case("spec-cross-attention-without-text", "Cross-attention fusion without text to attend to",
               lambda: UNetSpec.conditioned(text_channels=None), "UNetSpec.levels[2].fusion",
               "text to attend to", "text_channels=None", "Use 'dynamic_conv' or 'gated'"),
    _spec_case("spec-fusion-levels-overlap", "One level given two fusion kinds",
               lambda: UNetSpec.conditioned(dynamic_conv_levels=(1, 3)), "UNetSpec.conditioned(...)",
               "disjoint dynamic_conv_levels and cross_attention_levels", "[3]", "one fusion kind"),
    _spec_case("spec-conditioning-without-fusion", "Conditioning with no fusion site anywhere",
               lambda: tiny_spec(conditioning=ConditioningSpec()), "UNetSpec fusion schedule",
               "at least one level or the middle with a fusion kind", "'none' everywhere", "Set LevelSpec.fusion"),
    _spec_case("spec-router-temperature", "A zero routing temperature for dynamic convolution",
               lambda: ConditioningSpec(router_temperature=0), "ConditioningSpec.router_temperature", "a number > 0",
               "0", "1.0"),
    _spec_case("spec-upcast-not-bool", "A string for the attention upcast flag", lambda: tiny_spec(upcast_attention="fp32"),
               "UNetSpec.upcast_attention", "a bool", "'fp32'", "True or False"),
    _spec_case("spec-channels-not-tuple", "One channel count where one per level is expected",
               lambda: UNetSpec.default(channels=64), "UNetSpec.default(channels=...)",
               "a non-empty tuple of ints >= 1", "64", "Give one value per level"),
    _spec_case("spec-levels-not-tuple", "One level number where a tuple of them is expected",
               lambda: UNetSpec.conditioned(dynamic_conv_levels=1), "UNetSpec.conditioned(dynamic_conv_levels=...)",
               "a tuple of 1-based level numbers in 1..4", "1", "pass a tuple such as (4,)"),
    Case(id="spec-not-a-spec", topic="spec", mistake="A spec name instead of a UNetSpec",
         trigger=lambda ctx: UNet3D("default"), error=InputError, argument="spec", expected="expected a UNetSpec",
         actual="got str", fix="UNetSpec.default()"),
    # ---- blocks used on their own ------------------------------------------------------------
    Case(id="block-channels", topic="blocks", mistake="A block given a feature map with the wrong channels",
         trigger=lambda ctx: ResBlock3D(in_channels=8, out_channels=8, emb_channels=16, num_groups=4)(
             torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 16)),
         error=ShapeContractError, argument="x", expected="expected 8 input channels in all (in_channels)",
         actual="got x with 3", fix="Pass x (and skip) whose channels add up to in_channels"),
    Case(id="block-skip-channels", topic="blocks",
         mistake="A decoder block given a main path and a skip whose channels do not add up to its input channels",
         trigger=lambda ctx: ResBlock3D(in_channels=8, out_channels=4, emb_channels=16, num_groups=4)(
             torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 16), skip=torch.zeros(1, 2, 2, 4, 4)),
         error=ShapeContractError, argument="x + skip", expected="expected 8 input channels in all (in_channels)",
         actual="got x with 4 and skip with 2", fix="Pass x (and skip) whose channels add up to in_channels"),
    _spec_case("block-kernel-not-triple", "A block built with one kernel size where one per axis is expected",
               lambda: ResBlock3D(in_channels=8, out_channels=8, emb_channels=None, num_groups=4, kernel_size=3),
               "ResBlock3D(kernel_size=...)", "a (depth, height, width) triple of 3 ints", "3",
               "Give one value per axis, e.g. (3, 3, 3)"),
    _spec_case("block-zero-groups", "A block built with zero GroupNorm groups",
               lambda: ResBlock3D(in_channels=8, out_channels=8, emb_channels=None, num_groups=0),
               "ResBlock3D(num_groups=...)", "an int >= 1", "0", "Use a value of at least 1"),
    _spec_case("block-temperature", "A dynamic convolution built with a routing temperature of zero (NaN output)",
               lambda: DynamicConvFusion3D(channels=8, num_groups=4, temperature=0),
               "DynamicConvFusion3D(temperature=...)", "a number > 0", "0", "Pick a value in that range"),
    _spec_case("block-encoder-levels", "A condition encoder given fewer strides than levels (zip would drop one)",
               lambda: CondImageEncoder3D(image_channels=2, channels=(8, 16), strides=((2, 2, 2),),
                                          kernel_sizes=((3, 3, 3),) * 2, down_kernel_sizes=((3, 3, 3),) * 2, num_groups=4),
               "CondImageEncoder3D(strides=...)", "one (depth, height, width) triple per level (2, as channels has)",
               "((2, 2, 2),)", "Give one per level"),
    Case(id="block-dtype", topic="blocks", mistake="A block given a float64 volume while its weights are float32",
         trigger=lambda ctx: ResBlock3D(in_channels=8, out_channels=8, emb_channels=16, num_groups=4)(
             torch.zeros(1, 8, 2, 4, 4, dtype=torch.float64), torch.zeros(1, 16)),
         error=InputError, argument="ResBlock3D.forward: x", expected="expected dtype torch.float32",
         actual="got torch.float64", fix="x.to(torch.float32)"),
    Case(id="block-optional-argument", topic="blocks",
         mistake="A block's optional input (the timestep embedding) given for another batch size",
         trigger=lambda ctx: ResBlock3D(in_channels=8, out_channels=8, emb_channels=16, num_groups=4)(
             torch.zeros(2, 8, 2, 4, 4), torch.zeros(3, 16)),
         error=ShapeContractError, argument="ResBlock3D.forward: emb", expected="expected Float[Tensor, 'b 16'] | None",
         actual="got f32[3,16]", fix="shapes match the annotation"),
    Case(id="shape-checks-not-bool", topic="blocks", mistake="The shape-check switch given the string 'false'",
         trigger=lambda ctx: set_shape_checks("false"), error=InputError, argument="enabled",
         expected="expected True or False", actual="got 'false'", fix="Pass a bool"),
    Case(id="block-conv-shift", topic="blocks",
         mistake="A convolution's per-channel shift given per sample (or as one value), which would broadcast",
         trigger=lambda ctx: Conv3d(4, 3, kernel_size=(3, 3, 3))(torch.zeros(2, 4, 2, 4, 4), shift=torch.zeros(2, 3)),
         error=ShapeContractError, argument="shift", expected="expected Float[Tensor, '3'] | None",
         actual="got f32[2,3]", fix="shapes match the annotation"),
    Case(id="block-conv-by-taps-even", topic="blocks", mistake="The taps form of a convolution given an even kernel",
         trigger=lambda ctx: conv3d_by_taps(torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 4, 2, 2, 2)), error=InputError,
         argument="weight", expected="expected an odd kernel size along every axis", actual="got (2, 2, 2)",
         fix="Use F.conv3d for even kernels"),
    Case(id="block-stride", topic="blocks", mistake="A downsampling block given a depth its stride does not divide",
         trigger=lambda ctx: Downsample3D(channels=4, stride=(2, 2, 2))(torch.zeros(1, 4, 3, 4, 4)),
         error=InputError, argument="x", expected="multiples of the stride (2, 2, 2)", actual="got (3, 4, 4)",
         fix="Crop or pad the volume"),
    Case(id="block-heads", topic="blocks", mistake="An attention block whose channels are not a whole number of heads",
         trigger=lambda ctx: MultiHeadSelfAttention3D(channels=12, head_channels=8, num_groups=4), error=SpecError,
         argument="MultiHeadSelfAttention3D(channels=...)", expected="a multiple of head_channels=8", actual="got 12",
         fix="Use 8 or 16 channels"),
    Case(id="block-groups", topic="blocks", mistake="A residual block whose channels do not split into the GroupNorm groups",
         trigger=lambda ctx: ResBlock3D(in_channels=8, out_channels=12, emb_channels=16, num_groups=8), error=SpecError,
         argument="ResBlock3D(out_channels=...)", expected="a multiple of num_groups=8", actual="got 12",
         fix="or change num_groups"),
    Case(id="block-embedding-batch", topic="blocks", mistake="Timestep embedding asked for another batch size than t has",
         trigger=lambda ctx: TimestepEmbedding(channels=8, out_channels=16)(torch.tensor([1.0, 2.0]), batch_size=3),
         error=InputError, argument="t", expected="expected shape () or (3,)", actual="got (2,)",
         fix="one timestep per sample"),
    # ---- memory switches ---------------------------------------------------------------------
    Case(id="memory-checkpoint-level", topic="memory", mistake="Checkpointing a level the spec does not have",
         trigger=lambda ctx: ctx.model.set_gradient_checkpointing(levels=(3,)), error=InputError,
         argument="UNet3D.set_gradient_checkpointing(levels=...)",
         expected="expected a tuple of 1-based level numbers in 1..2", actual="got (3,)", fix="range(1, 3) for all"),
    Case(id="memory-selective-not-bool", topic="memory", mistake="A switch given as a string",
         trigger=lambda ctx: ctx.model.set_gradient_checkpointing(selective="no"), error=InputError,
         argument="UNet3D.set_gradient_checkpointing(selective=...)", expected="expected True, False or None",
         actual="got 'no'", fix="Pass a bool, or None"),
    Case(id="plan-selective-not-bool", topic="memory", mistake="The planner's selective switch given as a string",
         trigger=lambda ctx: memory_plan(UNetSpec.default(), (1, 1, 8, 32, 32), selective="on"), error=InputError,
         argument="memory_plan(selective=...)", expected="expected True, False or None", actual="got 'on'",
         fix="Pass a bool, or None"),
    Case(id="plan-volume-not-shape", topic="memory", mistake="The planner given the volume instead of its shape",
         trigger=lambda ctx: plan(tiny_spec(), torch.zeros(1, 1, 4, 8, 8)), error=InputError, argument="input_shape",
         expected="expected a shape such as (1, 1, 8, 256, 256)", actual="got a Tensor of shape (1, 1, 4, 8, 8)",
         fix="Pass its shape: x.shape"),
    Case(id="plan-fractional-size", topic="memory", mistake="A shape with a fractional size, which int() would truncate",
         trigger=lambda ctx: plan(tiny_spec(), (1, 1, 4.5, 8, 8)), error=InputError, argument="input_shape",
         expected="expected whole numbers", actual="got (1, 1, 4.5, 8, 8)", fix="Pass a tuple of ints"),
    Case(id="plan-model-not-spec", topic="memory", mistake="The planner given the model instead of its spec",
         trigger=lambda ctx: plan(ctx.model, (1, 1, 4, 8, 8)), error=InputError, argument="spec",
         expected="expected a UNetSpec", actual="got UNet3D", fix="Pass model.spec"),
    Case(id="memory-plan-dtype", topic="memory", mistake="Planning for a dtype the planner does not know",
         trigger=lambda ctx: memory_plan(tiny_spec(), (1, 1, 4, 8, 8), dtype="float32"), error=InputError,
         argument="dtype", expected="expected one of ['bf16', 'fp16', 'fp32']", actual="got 'float32'",
         fix="dtype='bf16'"),
    Case(id="memory-plan-device", topic="memory", mistake="Planning for a device the planner does not know",
         trigger=lambda ctx: memory_plan(tiny_spec(), (1, 1, 4, 8, 8), device="gpu"), error=InputError,
         argument="device", expected="expected one of ['cpu', 'cuda']", actual="got 'gpu'", fix="device='cuda'"),
    Case(id="memory-weight-grad-method", topic="memory", mistake="An unknown weight-gradient method",
         trigger=lambda ctx: set_weight_grad_method("fast"), error=InputError, argument="method",
         expected="expected one of 'auto', 'depth_taps', 'aten'", actual="got 'fast'",
         fix="set_weight_grad_method('aten')"),
    # ---- checkpoints -------------------------------------------------------------------------
    Case(id="ckpt-other-spec", topic="checkpoint", mistake="Loading weights into a model of another spec",
         trigger=lambda ctx: load_weights(UNet3D(tiny_spec(head_channels=8)), ctx.checkpoint), error=CheckpointError,
         argument="directory", expected="a checkpoint saved from the model's spec",
         actual="spec.head_channels: checkpoint 4, model 8", fix="UNet3D.from_pretrained(directory)"),
    Case(id="ckpt-other-channels", topic="checkpoint", mistake="Loading weights of other channel widths",
         trigger=lambda ctx: load_weights(UNet3D(tiny_spec(levels=(LevelSpec(channels=8, stride=(2, 2, 2)),
                                                                   LevelSpec(channels=24, stride=(1, 2, 2))))),
                                          ctx.checkpoint),
         error=CheckpointError, argument="directory", expected="a checkpoint saved from the model's spec",
         actual="keys with another shape", fix="load a checkpoint saved from this spec"),
    Case(id="ckpt-missing-spec", topic="checkpoint", mistake="A directory without spec.json",
         trigger=lambda ctx: from_pretrained(ctx.empty), error=CheckpointError, argument="directory",
         expected="expected spec.json and model.safetensors", actual="got []", fix="written by save_pretrained()"),
    Case(id="ckpt-missing-weights", topic="checkpoint", mistake="A directory with the spec but without the weights",
         trigger=lambda ctx: from_pretrained(ctx.damaged_checkpoint(lambda d: (d / WEIGHTS_FILE).unlink())),
         error=CheckpointError, argument="directory", expected="expected model.safetensors", actual="['spec.json']",
         fix="written by save_pretrained()"),
    Case(id="ckpt-corrupt-weights", topic="checkpoint", mistake="A truncated or corrupt weights file",
         trigger=lambda ctx: from_pretrained(ctx.damaged_checkpoint(lambda d: (d / WEIGHTS_FILE).write_bytes(b"oops"))),
         error=CheckpointError, argument="model.safetensors", expected="expected a safetensors file",
         actual="cannot be read", fix="save it again"),
    Case(id="ckpt-save-not-a-unet", topic="checkpoint", mistake="Saving a module that is not a UNet3D",
         trigger=lambda ctx: save_pretrained(torch.nn.Linear(2, 2), ctx.scratch / "linear"), error=CheckpointError,
         argument="model", expected="expected a UNet3D", actual="got Linear", fix="UNet3D(spec)"),
]


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return Context.create(tmp_path_factory.mktemp("catalogue"))


def test_the_catalogue_has_at_least_40_distinct_entries():
    ids = [case.id for case in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.id)
def test_each_mistake_raises_our_error_naming_argument_expected_actual_and_fix(context, case):
    ran = []
    model = context.conditioned if case.conditioned else context.model
    submodules = [m for name, m in model.named_modules() if name]  # the UNet itself is called, of course
    hooks = [m.register_forward_pre_hook(lambda *_: ran.append(1)) for m in submodules]
    try:
        with pytest.raises(case.error) as caught:
            case.trigger(context)
    finally:
        for hook in hooks:
            hook.remove()
    message = str(caught.value)
    for part in ("argument", "expected", "actual", "fix"):
        assert getattr(case, part) in message, f"{case.id}: the message does not contain the {part} {getattr(case, part)!r}:\n{message}"
    if case.error is not ShapeContractError:  # ours: "<argument>: expected <value>, got <value>. <what to do>"
        head = message.split(": expected", 1)[0]
        assert head == case.argument or head.startswith(f"{case.argument} ") or head.endswith(case.argument), (
            f"{case.id}: the message does not start by naming {case.argument!r}:\n{message}")
    if case.forward:
        assert ran == [], f"{case.id}: the input was rejected only after a module had run"


# ---- the docs page ---------------------------------------------------------------------------

_TOPICS = {
    "x": ("The volume `x`", "`UNet3D.forward(x, t)` validates `x` before any compute."),
    "t": ("The timesteps `t`", "`t` may be an int, a float, a 0-d tensor or one value per sample."),
    "conditions": ("Conditions: text and conditional images",
                   "`UNet3D.forward(x, t, text=..., text_mask=..., text_pooled=..., cond_images=..., cond_available=...)` "
                   "or `conditions=model.encode_conditions(...)`; checked before the condition encoder runs."),
    "spec": ("The spec", "A `UNetSpec` is validated when it is built, before any module exists."),
    "blocks": ("Blocks used on their own", "Each block checks its constructor arguments, and in eager mode its "
               "jaxtyping shape contract and the dtype and device of its floating-point inputs."),
    "memory": ("Memory switches and the planner",
               "`UNet3D.set_gradient_checkpointing(...)` and `cpcbm_blocks.memory.memory_plan(...)`."),
    "checkpoint": ("Checkpoints", "`save_pretrained` / `from_pretrained` / `load_weights` (`cpcbm_blocks.checkpoint`)."),
}


def _message_for_docs(message: str, context: Context) -> str:
    lines = message.splitlines()
    if lines and lines[0].endswith("jaxtyping's report follows."):
        lines = lines[:1] + ["(followed by jaxtyping's full report)"]
    text = "\n".join(lines[:6] + (["..."] if len(lines) > 6 else []))
    text = text.replace(str(context.checkpoint.parent), "runs")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", "<br>")


def render_errors_page(context: Context) -> str:
    """The Markdown of docs/errors.md: the catalogue with the messages the library really produces."""
    out = ["# Errors you may see and what to do", "",
           "Every error raised on purpose by `cpcbm_blocks` derives from `cpcbm_blocks.errors.CpcbmError` (and from",
           "the fitting builtin: `ValueError`, `TypeError` or `RuntimeError`). Its message names the argument, the",
           "expected value and the actual one, and says what to do. Errors about inputs (`InputError`) are raised",
           "before any compute, so a bad call costs no time or memory.", "",
           "| type | raised when |", "|---|---|",
           "| `SpecError` | a `UNetSpec`, `LevelSpec` or `MidSpec` is invalid (at construction) |",
           "| `InputError` | a forward input cannot work: rank, channels, dtype, device, size, batch, timesteps |",
           "| `ShapeContractError` | a block's jaxtyping shape contract is violated (eager mode) |",
           "| `TraceMismatchError` | a step of the UNet produced another shape than its plan (a bug in a block) |",
           "| `CheckpointError` | a checkpoint is missing, damaged, or saved from another spec |", "",
           "The tables below are generated from the test table in `tests/test_error_catalogue.py`, with the",
           "messages the library produces today, so they cannot drift from the code.", ""]
    for topic, (title, intro) in _TOPICS.items():
        out += [f"## {title}", "", intro, "", "| mistake | error | message |", "|---|---|---|"]
        for case in (c for c in CATALOGUE if c.topic == topic):
            try:
                case.trigger(context)
            except case.error as error:
                message = _message_for_docs(str(error), context)
            else:
                raise AssertionError(f"{case.id} raised nothing")
            out.append(f"| {case.mistake} | `{case.error.__name__}` | {message} |")
        out.append("")
    return "\n".join(out)


def test_the_errors_page_is_generated_from_this_catalogue(context):
    assert ERRORS_PAGE.read_text() == render_errors_page(context), (
        "docs/errors.md is out of date: regenerate it with `python -m tests.test_error_catalogue`")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        ERRORS_PAGE.write_text(render_errors_page(Context.create(Path(scratch))))
    print(f"wrote {ERRORS_PAGE.relative_to(ROOT)} ({len(CATALOGUE)} entries)")
