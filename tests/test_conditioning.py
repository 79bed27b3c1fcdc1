"""The conditioned UNet: trace property, condition errors, encode-once reuse, gradients, training."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import (ConditioningSpec, FusionKind, InputError, SpecError, UNet3D, UNetSpec, layout, parse_trace,
                          plan, record_trace)
from cpcbm_blocks.layout import Op

from .conftest import randomize_, seed_trace_text, unet_specs, valid_input_shapes

E = 12  # text width of the small specs


def small_conditioned(**conditioning):
    return UNetSpec.conditioned(sample_size=(4, 16, 16), channels=(8, 16, 16, 16), num_groups=4, head_channels=4,
                                time_embedding_channels=16,
                                conditioning=ConditioningSpec(**{"text_channels": E, "image_channels": 3, **conditioning}))


def inputs(batch=2, size=(4, 16, 16), tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(text=torch.randn(batch, tokens, E, generator=g),
                text_mask=torch.ones(batch, tokens, dtype=torch.bool),
                cond_images=torch.randn(batch, 3, *size, generator=g),
                cond_available=torch.ones(batch, 3, dtype=torch.bool))


def _without_fusion(transitions):
    return [(t.step.section.value, t.step.group, t.step.op.value, t.in_shape, t.skip_shape, t.out_shape)
            for t in transitions if not t.step.op.is_fusion and not t.step.beyond_seed]


def test_the_conditioned_default_only_adds_fusion_transitions_to_the_seed_trace():
    spec = UNetSpec.conditioned()
    with torch.device("meta"):
        model = UNet3D(spec)
    with record_trace(model) as trace:
        model(torch.empty(1, 1, 8, 256, 256, device="meta"), 999, text=torch.empty(1, 77, 512, device="meta"),
              cond_images=torch.empty(1, 3, 8, 256, 256, device="meta"))
    fusion = [t for t in trace.transitions if t.step.op.is_fusion]
    assert len(fusion) == 10 and all(t.in_shape == t.out_shape and t.skip_shape is None for t in fusion)
    seed = [(s, g, op, i, k, o) for s, g, _, op, i, k, o in parse_trace(seed_trace_text())]
    assert _without_fusion(trace.transitions) == seed
    assert trace.transitions == list(plan(spec, (1, 1, 8, 256, 256)).transitions)


def test_the_conditioned_default_follows_the_seeds_fusion_schedule():
    spec = UNetSpec.conditioned()
    assert [lv.fusion for lv in spec.levels] == [FusionKind.DYNAMIC_CONV] * 2 + [FusionKind.CROSS_ATTENTION] * 2
    assert spec.mid.fusion is FusionKind.CROSS_ATTENTION
    assert (spec.conditioning.text_channels, spec.conditioning.image_channels) == (512, 3)
    assert UNetSpec.conditioned(text_channels=768).conditioning.text_channels == 768
    assert UNetSpec.from_json(spec.to_json()) == spec


@st.composite
def conditioned_specs(draw):
    spec = draw(unet_specs(max_levels=3))
    text = draw(st.sampled_from([None, 6]))
    images = draw(st.integers(0 if text else 1, 2))
    kinds = [FusionKind.NONE, FusionKind.GATED, FusionKind.DYNAMIC_CONV] + ([FusionKind.CROSS_ATTENTION] if text else [])
    levels = tuple(dataclasses.replace(lv, fusion=draw(st.sampled_from(kinds))) for lv in spec.levels)
    mid = dataclasses.replace(spec.mid, fusion=draw(st.sampled_from(kinds[1:])))
    conditioning = ConditioningSpec(text_channels=text, image_channels=images,
                                    text_to_timestep=bool(text) and draw(st.booleans()),
                                    dynamic_conv_experts=draw(st.integers(1, 3)))
    return dataclasses.replace(spec, levels=levels, mid=mid, conditioning=conditioning)


@given(st.data())
def test_random_fusion_schedules_run_on_meta_with_the_trace_equal_to_the_plan(data):
    spec = data.draw(conditioned_specs())
    shape = data.draw(valid_input_shapes(spec))
    batch, cond = shape[0], spec.conditioning
    with torch.device("meta"):
        model = UNet3D(spec)
        arguments = {}
        if cond.has_text:
            arguments["text"] = torch.empty(batch, data.draw(st.integers(1, 4)), cond.text_channels)
        if cond.has_images:
            arguments["cond_images"] = torch.empty(batch, cond.image_channels, *shape[2:])
    with record_trace(model) as trace:
        out = model(torch.empty(shape, device="meta"), 1, **arguments)
    assert out.shape == (batch, spec.out_channels, *shape[2:])
    assert trace.transitions == list(plan(spec, shape).transitions)
    unconditioned = dataclasses.replace(spec, conditioning=None, mid=dataclasses.replace(spec.mid, fusion=FusionKind.NONE),
                                        levels=tuple(dataclasses.replace(lv, fusion=FusionKind.NONE) for lv in spec.levels))
    assert _without_fusion(trace.transitions) == _without_fusion(plan(unconditioned, shape).transitions)


def test_conditions_encoded_once_give_the_same_prediction_at_every_step():
    model = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05)
    x, given = torch.randn(2, 1, 4, 16, 16), inputs()
    conditions = model.encode_conditions(**given)
    again = model.encode_conditions(**given)
    assert all(torch.equal(conditions.maps[k], again.maps[k]) for k in conditions.maps)
    for t in (999, 500, torch.tensor([3.0, 700.0])):
        torch.testing.assert_close(model(x, t, conditions=conditions), model(x, t, **given))


def test_the_prediction_depends_on_text_and_images_and_absent_ones_are_handled():
    model = randomize_(UNet3D(small_conditioned()), scale=0.1).eval()
    x, given = torch.randn(2, 1, 4, 16, 16), inputs()
    base = model(x, 10, **given)
    no_text = model(x, 10, **{**given, "text_mask": torch.zeros(2, 5, dtype=torch.bool)})
    no_images = model(x, 10, **{**given, "cond_available": torch.zeros(2, 3, dtype=torch.bool)})
    other_text = model(x, 10, **{**given, "text": given["text"] + 1})
    for variant in (no_text, no_images, other_text):
        assert torch.isfinite(variant).all() and not torch.allclose(variant, base)
    # a fully masked text row is absent text: the text values no longer matter, and nothing is NaN
    masked = {**given, "text_mask": torch.zeros(2, 5, dtype=torch.bool)}
    torch.testing.assert_close(model(x, 10, **masked), model(x, 10, **{**masked, "text": given["text"] * 50}))


def test_every_parameter_gets_a_gradient_whatever_is_absent():
    """What DistributedDataParallel(find_unused_parameters=False) needs: all parameters always used."""
    model = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05)
    x, given = torch.randn(2, 1, 4, 16, 16), inputs()
    for case in ({}, {"text_mask": torch.zeros(2, 5, dtype=torch.bool)},
                 {"cond_available": torch.zeros(2, 3, dtype=torch.bool)}):
        model.zero_grad(set_to_none=True)
        model(x, 10, **{**given, **case}).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert missing == [], case


def test_gradients_reach_the_condition_encoders_and_every_fusion_parameter():
    model = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05)
    given = inputs()
    given["text_mask"][1] = False  # sample 1 has no text, sample 0 no images: the null vectors are read too
    given["cond_available"][0] = False
    model(torch.randn(2, 1, 4, 16, 16), 10, **given).square().mean().backward()
    fusion_keys = [s.module_key for s in model.steps if s.op.is_fusion]
    assert fusion_keys
    for name, parameter in model.named_parameters():
        is_fusion = any(name.startswith(f"blocks.{key}.") for key in fusion_keys)
        if name.startswith("conditioner.") or is_fusion:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_conditioned_unet_trains_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = UNet3D(small_conditioned())
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, target, given = torch.randn(2, 1, 4, 16, 16), torch.randn(2, 1, 4, 16, 16), inputs()
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = (model(x, torch.tensor([10, 500]), **given) - target).square().mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(("spec_kind", "change", "fragments"), [
    ("plain", {"text": torch.randn(2, 5, E)}, ["text: expected None because this UNet's spec has no conditioning", "UNetSpec.conditioned"]),
    ("plain", {"cond_images": torch.randn(2, 3, 4, 16, 16)}, ["cond_images: expected None because this UNet's spec has no conditioning"]),
    ("cond", {"text": None}, ["text: expected token embeddings", "this spec conditions on text", "got None", "all-False text_mask"]),
    ("cond", {"cond_images": None}, ["cond_images: expected (B, 3, D, H, W) images", "this spec conditions on 3 image(s)", "got None", "cond_available=False"]),
    ("cond", {"text": torch.randn(2, 5, E + 1)}, ["text: expected token width 12", "got 13"]),
    ("cond", {"text": torch.randn(3, 5, E), "text_mask": torch.ones(3, 5, dtype=torch.bool)},
     ["text, cond_images: expected the same batch size", "'text': 3", "'cond_images': 2"]),
    ("cond", {"cond_images": torch.randn(2, 3, 4, 32, 32)}, ["cond_images: expected depth, height and width (4, 16, 16)",
                                                           "got (4, 32, 32)", "x's grid"]),
    ("cond", {"cond_images": torch.randn(2, 2, 4, 16, 16)}, ["cond_images: expected 3 conditional image(s)", "got 2"]),
    ("cond", {"text_mask": torch.ones(2, 4, dtype=torch.bool)}, ["text_mask: expected shape (2, 5)", "got (2, 4)"]),
    ("cond", {"text_mask": torch.ones(2, 5)}, ["text_mask: expected a bool tensor", "torch.float32"]),
    ("cond", {"cond_available": torch.ones(2, 2, dtype=torch.bool)}, ["cond_available: expected shape (2, 3)"]),
    ("cond", {"text": torch.randn(2, E)}, ["text: expected 3 dimensions", "got 2"]),
    ("cond", {"text_pooled": torch.randn(2, E + 2)}, ["text_pooled: expected shape (2, 12)", "got (2, 14)"]),
])
def test_bad_conditions_are_rejected_before_any_compute(spec_kind, change, fragments):
    spec = small_conditioned() if spec_kind == "cond" else UNetSpec.default(sample_size=(4, 16, 16), channels=(8, 16, 16, 16),
                                                                               num_groups=4, head_channels=4)
    model = UNet3D(spec)
    calls = []
    model.blocks["conv_in"].register_forward_pre_hook(lambda *_: calls.append(1))
    given = inputs() if spec_kind == "cond" else {}
    with pytest.raises(InputError) as caught:
        model(torch.randn(2, 1, 4, 16, 16), 5, **{**given, **change})
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert calls == []


def test_encoded_conditions_must_match_x_and_not_be_mixed_with_raw_ones():
    model = UNet3D(small_conditioned())
    conditions = model.encode_conditions(**inputs(batch=2))
    with pytest.raises(InputError, match="conditions: expected the batch size of x \\(3\\)"):
        model(torch.randn(3, 1, 4, 16, 16), 5, conditions=conditions)
    with pytest.raises(InputError, match="expected either raw conditions or conditions=, got both"):
        model(torch.randn(2, 1, 4, 16, 16), 5, conditions=conditions, text=inputs()["text"])
    plain = UNet3D(UNetSpec.default(sample_size=(4, 16, 16), channels=(8, 16, 16, 16), num_groups=4, head_channels=4))
    with pytest.raises(InputError, match="conditions: expected None because this UNet's spec has no conditioning"):
        plain(torch.randn(2, 1, 4, 16, 16), 5, conditions=conditions)


@pytest.mark.parametrize(("build", "fragments"), [
    (lambda: dataclasses.replace(UNetSpec.default(), levels=(
        dataclasses.replace(UNetSpec.default().levels[0], fusion="gated"), *UNetSpec.default().levels[1:])),
     ["levels[0].fusion", "'none' when UNetSpec.conditioning is None"]),
    (lambda: dataclasses.replace(UNetSpec.default(), mid=dataclasses.replace(UNetSpec.default().mid, fusion="attention")),
     ["MidSpec.fusion", "'gated'", "'attention'"]),
    (lambda: ConditioningSpec(text_channels=None, image_channels=0), ["text_channels or image_channels", "neither"]),
    (lambda: UNetSpec.conditioned(text_channels=None), ["'cross_attention'", "text_channels=None"]),
    (lambda: dataclasses.replace(UNetSpec.default(), conditioning=ConditioningSpec()), ["fusion schedule", "'none' everywhere"]),
    (lambda: ConditioningSpec(router_temperature=0), ["router_temperature", "> 0"]),
    (lambda: ConditioningSpec(text_channels=None, text_to_timestep=True), ["text_to_timestep", "text_channels=None"]),
    (lambda: UNetSpec.conditioned(dynamic_conv_levels=(1, 3)), ["disjoint", "[3]"]),
])
def test_invalid_conditioned_specs_are_rejected(build, fragments):
    with pytest.raises(SpecError) as caught:
        build()
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_fusion_steps_keep_the_fused_features_as_the_skip():
    steps = layout(UNetSpec.conditioned())
    down1 = [s for s in steps if s.section.value == "down" and s.group == 1]
    assert [(s.op, s.gives_skip) for s in down1] == [(Op.RES, True), (Op.RES, False), (Op.FUSE_DYNAMIC_CONV, True),
                                                     (Op.DOWN, False)]


def test_with_fusion_gates_at_their_initial_zero_the_conditions_cannot_change_the_prediction():
    """Every fusion step is a zero-initialised residual: a fresh conditioned UNet is the plain UNet."""
    model = UNet3D(small_conditioned())
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".gate")}
    assert len(gates) == sum(s.op.is_fusion for s in model.steps)
    randomize_(model, scale=0.1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in gates:
                parameter.copy_(gates[name])
    x = torch.randn(2, 1, 4, 16, 16)
    one, other = inputs(seed=0), inputs(seed=1)
    other["cond_available"][0] = False
    torch.testing.assert_close(model(x, 10, **one), model(x, 10, **other))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n in gates).fill_(0.5)
    assert not torch.allclose(model(x, 10, **one), model(x, 10, **other))


@pytest.mark.parametrize(("conditioning", "given", "fragment"), [
    (dict(text_channels=None), {"text": torch.randn(2, 5, E)}, "text: expected None because this UNet's spec does not condition on text"),
    (dict(image_channels=0), {"cond_available": torch.ones(2, 3, dtype=torch.bool)},
     "cond_available: expected None because this UNet's spec does not condition on images"),
])
def test_a_condition_of_a_kind_the_spec_does_not_use_is_refused(conditioning, given, fragment):
    spec = UNetSpec.conditioned(sample_size=(4, 16, 16), channels=(8, 16, 16, 16), num_groups=4, head_channels=4,
                                cross_attention_levels=(), mid_fusion=FusionKind.GATED,
                                conditioning=ConditioningSpec(**{"text_channels": E, "image_channels": 3, **conditioning}))
    model = UNet3D(spec)
    required = {k: v for k, v in inputs().items() if k in (("text", "text_mask") if spec.conditioning.has_text
                                                           else ("cond_images", "cond_available"))}
    with pytest.raises(InputError, match=fragment):
        model(torch.randn(2, 1, 4, 16, 16), 5, **{**required, **given})
