"""Fuzzing the whole UNet: random specs (valid or not) and random inputs (valid or not).

Every draw must end in one of two ways:

* it runs, the recorded trace equals `plan(spec, x.shape)` and the output has the planned shape; or
* it raises one of the library's own errors (`CpcbmError`) before any module has run.

An error from inside torch, an error of ours raised after compute started, or an output of another
shape fails the property. CI runs `max(40, profile)` examples; run 500 with

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_fuzz.py
"""

import contextlib
import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cpcbm_blocks import CpcbmError, InputError, LevelSpec, MidSpec, UNet3D, UNetSpec, plan, record_trace, shape_checks
from cpcbm_blocks.spec import ConditioningSpec

MAX_CPU_VOXELS = 512
"""Draws with a volume this small run for real on the CPU; larger ones run on the meta device."""


SPEC_MISTAKES = ["num_groups", "head_channels", "no levels", "channels", "num_res_blocks", "stride", "kernel_size",
                 "num_segments", "in_channels", "timestep_injection", "dropout", "fusion", "conditioning"]
INPUT_MISTAKES = ["batch", "channels", "spatial", "rank", "dtype", "device", "t", "text", "text_mask", "cond_images",
                  "cond_available", "conditions"]
FUSIONS = ["none", "gated", "dynamic_conv", "cross_attention"]


@st.composite
def raw_spec_fields(draw):
    """Keyword arguments for UNetSpec, LevelSpec and MidSpec: valid, or with one or two mistakes."""
    mistakes = set(draw(st.lists(st.sampled_from(SPEC_MISTAKES), max_size=2)) if draw(st.booleans()) else [])
    pick = lambda name, valid, invalid: draw(invalid if name in mistakes else valid)  # noqa: E731
    num_groups = pick("num_groups", st.sampled_from([1, 2, 4]), st.sampled_from([0, 3]))
    head_channels = pick("head_channels", st.sampled_from([1, 2, 4]), st.sampled_from([0, 3]))
    unit = math.lcm(max(num_groups, 1), max(head_channels, 1))
    conditioned = draw(st.booleans())
    fusion = lambda: pick("fusion", st.sampled_from(FUSIONS if conditioned else ["none"]),  # noqa: E731
                          st.sampled_from(FUSIONS if not conditioned else ["attention"]))
    levels = []
    for _ in range(pick("no levels", st.integers(1, 3), st.just(0))):
        levels.append(dict(
            # unit == num_groups (one channel per group) happens often, so the GroupNorm guard is reached.
            channels=pick("channels", st.sampled_from([unit, 2 * unit]), st.integers(0, 6)),
            num_res_blocks=pick("num_res_blocks", st.integers(1, 2), st.just(0)),
            attention=draw(st.booleans()),
            stride=pick("stride", st.tuples(*[st.sampled_from([1, 2])] * 3), st.tuples(*[st.integers(0, 2)] * 3)),
            kernel_size=pick("kernel_size", st.sampled_from([(3, 3, 3), (1, 3, 3), (1, 1, 1)]), st.just((2, 3, 3))),
            fusion=fusion(),
        ))
    mid = dict(num_segments=pick("num_segments", st.integers(1, 2), st.just(0)), share_weights=draw(st.booleans()),
               attention=draw(st.booleans()), kernel_size=draw(st.sampled_from([(3, 3, 3), (1, 3, 3)])), fusion=fusion())
    top = dict(num_groups=num_groups, head_channels=head_channels,
               in_channels=pick("in_channels", st.integers(1, 2), st.just(0)), out_channels=draw(st.integers(1, 2)),
               time_embedding_channels=draw(st.sampled_from([4, 8])),
               timestep_injection=pick("timestep_injection", st.sampled_from(["add", "scale_shift"]), st.just("film")),
               dropout=pick("dropout", st.just(0.0), st.just(1.0)))
    if conditioned:
        top["conditioning"] = dict(text_channels=draw(st.sampled_from([None, 4])),
                                   image_channels=pick("conditioning", st.integers(1, 2), st.just(0)),
                                   text_to_timestep=draw(st.booleans()))
    return levels, mid, top


def build_spec(levels, mid, top) -> UNetSpec:
    conditioning = top.get("conditioning")
    top = {**top, "conditioning": None if conditioning is None else ConditioningSpec(**conditioning)}
    return UNetSpec(levels=tuple(LevelSpec(**level) for level in levels), mid=MidSpec(**mid), **top)


@st.composite
def raw_inputs(draw, spec: UNetSpec):
    """An input shape, dtype, device and timestep for `spec`: valid, or with one or two mistakes."""
    mistakes = set(draw(st.lists(st.sampled_from(INPUT_MISTAKES), max_size=2)) if draw(st.booleans()) else [])
    pick = lambda name, valid, invalid: draw(invalid if name in mistakes else valid)  # noqa: E731
    batch = pick("batch", st.integers(1, 2), st.just(0))
    channels = pick("channels", st.just(spec.in_channels), st.integers(1, 3).filter(lambda c: c != spec.in_channels))
    spatial = [pick("spatial", st.integers(1, 2).map(lambda k, m=m: k * m), st.integers(0, 2 * m + 1))
               for m in spec.stride_product]
    shape = (batch, channels, *spatial)
    rank = pick("rank", st.just(5), st.sampled_from([4, 6]))
    shape = shape[1:] if rank == 4 else shape if rank == 5 else (1, *shape)
    dtype = pick("dtype", st.just(torch.float32), st.sampled_from([torch.float64, torch.bfloat16, torch.int64, torch.bool]))
    x_on_meta = pick("device", st.just(False), st.just(True))
    valid_t = st.one_of(st.integers(0, 999), st.floats(0, 999), st.integers(0, 999).map(torch.tensor),
                        st.lists(st.integers(0, 999), min_size=batch, max_size=batch).map(torch.tensor))
    invalid_t = st.one_of(st.sampled_from([-1, -0.5, math.nan, math.inf, True, "500"]),
                          st.lists(st.integers(-1, 999), min_size=batch, max_size=batch).map(torch.tensor),
                          st.lists(st.floats(0, 999), min_size=0, max_size=3).map(torch.tensor),
                          st.just(torch.zeros(max(batch, 1), 1)))
    t = pick("t", valid_t, invalid_t)
    conditions = draw(raw_conditions(spec, batch=max(batch, 1), spatial=spatial, mistakes=mistakes))
    return shape, dtype, x_on_meta, t, conditions


@st.composite
def raw_conditions(draw, spec: UNetSpec, *, batch: int, spatial: list[int], mistakes: set[str]):
    """Keyword conditions for a forward: what the spec needs (some absent by mask), or with mistakes."""
    pick = lambda name, valid, invalid: draw(invalid if name in mistakes else valid)  # noqa: E731
    cond = spec.conditioning
    conditions = {}
    if cond is None:
        if "conditions" in mistakes:  # conditions given to a spec without conditioning
            conditions["text"] = torch.zeros(batch, 2, 4)
        return conditions
    tokens = draw(st.integers(1, 3))
    if cond.has_text and "conditions" not in mistakes:
        width = pick("text", st.just(cond.text_channels), st.sampled_from([cond.text_channels + 1]))
        text_batch = pick("text", st.just(batch), st.just(batch + 1))
        conditions["text"] = torch.randn(text_batch, tokens, width)
        conditions["text_mask"] = pick("text_mask", st.lists(st.booleans(), min_size=text_batch * tokens,
                                                             max_size=text_batch * tokens)
                                       .map(lambda v: torch.tensor(v).reshape(text_batch, tokens)),
                                       st.just(torch.ones(text_batch, tokens + 1, dtype=torch.bool)))
    if cond.has_images and "conditions" not in mistakes:
        k = pick("cond_images", st.just(cond.image_channels), st.just(cond.image_channels + 1))
        size = pick("cond_images", st.just(spatial), st.just([2 * v for v in spatial]))
        conditions["cond_images"] = torch.randn(batch, k, *size)
        conditions["cond_available"] = pick("cond_available", st.lists(st.booleans(), min_size=batch * k, max_size=batch * k)
                                            .map(lambda v: torch.tensor(v).reshape(batch, k)),
                                            st.just(torch.ones(batch, k)))
    return conditions


@settings(max_examples=max(40, settings.default.max_examples))
@given(st.data())
def test_every_draw_runs_as_planned_or_is_refused_by_our_own_error_before_compute(data):
    levels, mid, top = data.draw(raw_spec_fields(), label="spec fields")
    try:
        spec = build_spec(levels, mid, top)
    except CpcbmError:
        event("refused: invalid spec")
        return
    shape, dtype, x_on_meta, t, conditions = data.draw(raw_inputs(spec), label="input")
    device = "cpu" if math.prod(shape) <= MAX_CPU_VOXELS else "meta"
    with torch.device(device):
        model = UNet3D(spec)
    x = torch.ones(shape, device="meta" if x_on_meta else device).to(dtype)
    conditions = {name: value.to(device) for name, value in conditions.items()}

    ran = []
    for name, module in model.named_modules():
        if name:
            module.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        with record_trace(model) as trace:
            out = model(x, t, **conditions)
    except CpcbmError as error:
        assert ran == [], f"{type(error).__name__} raised after compute had started: {error}"
        event(f"refused: {type(error).__name__}")
        return
    event(f"ran on {device}" + (" with conditions" if spec.is_conditioned else ""))
    expected = plan(spec, shape)
    assert trace.transitions == list(expected.transitions)
    assert tuple(out.shape) == expected.output_shape
    assert out.dtype == x.dtype


@pytest.mark.parametrize("batch", [1, 2])
def test_group_norm_groups_of_one_value_are_refused_with_checks_on_or_off(batch):
    # One channel per group (4 channels, 4 groups) and a 1x1x1 map after the only downsampling. torch
    # raises its own ValueError for batch 1 and silently normalises the map to 0 for batch 2.
    spec = UNetSpec(levels=(LevelSpec(channels=4, stride=(1, 2, 2)),), num_groups=4, head_channels=4)
    model = UNet3D(spec)
    x = torch.randn(batch, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="more than 1 value per channel") if batch == 1 else contextlib.nullcontext():
        torch.nn.functional.group_norm(torch.randn(batch, 4, 1, 1, 1), 4)  # the torch behaviour we guard against
    for checks in (True, False):
        with shape_checks(checks), pytest.raises(InputError, match="at least 2 values per sample, got 1 value per group"):
            model(x, 3)
    model(torch.randn(batch, 1, 2, 2, 2), 3)  # twice the depth is enough: 2 values per group

