import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import InputError, Op, Section, TraceNotationError, UNetSpec, layout, parse_trace, plan, render_trace
from cpcbm_blocks.notation import strip_whitespace

from .conftest import seed_trace_text, unet_specs, valid_input_shapes

SEED_INPUT = (1, 1, 8, 256, 256)


def test_parsing_the_seed_trace_gives_exactly_the_default_plan():
    expected = [t.key() for t in plan(UNetSpec.default(), SEED_INPUT).seed_transitions()]
    assert parse_trace(seed_trace_text()) == expected
    assert len(expected) == 38


def test_rendering_the_default_plan_gives_back_the_seed_text():
    rendered = render_trace(plan(UNetSpec.default(), SEED_INPUT), include_head=False)
    assert strip_whitespace(rendered) == strip_whitespace(seed_trace_text())


def test_the_head_is_the_one_step_beyond_the_seed_and_is_marked():
    p = plan(UNetSpec.default(), SEED_INPUT)
    beyond = [t for t in p.transitions if t.step.beyond_seed]
    assert [t.render() for t in beyond] == ["32,8,256,256 ->(head)-> 1,8,256,256"]
    assert p.output_shape == SEED_INPUT


def test_skips_are_the_down_path_res_and_attn_outputs_consumed_in_reverse():
    steps = layout(UNetSpec.default())
    given_keys = [s.module_key for s in steps if s.gives_skip]
    assert given_keys == ["down1_res1", "down1_res2", "down2_res1", "down2_res2", "down3_res1", "down3_res2",
                          "down4_attn1", "down4_attn2"]
    taken = [s.module_key for s in steps if s.takes_skip]
    assert taken == ["up4_res1", "up4_res2", "up3_res1", "up3_res2", "up2_res1", "up2_res2", "up1_res1", "up1_res2"]


def test_mid_segments_have_their_own_modules_unless_shared():
    keys = [s.module_key for s in layout(UNetSpec.default()) if s.section is Section.MID]
    assert keys == ["mid1_res1", "mid1_attn", "mid1_res2", "mid2_res1", "mid2_attn", "mid2_res2"]
    shared = UNetSpec.default(mid=UNetSpec.default().mid.__class__(share_weights=True, kernel_size=(1, 3, 3)))
    keys = [s.module_key for s in layout(shared) if s.section is Section.MID]
    assert keys == ["mid1_res1", "mid1_attn", "mid1_res2"] * 2


@given(st.data())
def test_render_then_parse_round_trips_any_plan(data):
    spec = data.draw(unet_specs())
    p = plan(spec, data.draw(valid_input_shapes(spec)))
    assert parse_trace(render_trace(p)) == [t.key() for t in p.transitions]


@given(st.data())
def test_plan_is_consistent_for_random_specs(data):
    spec = data.draw(unet_specs())
    shape = data.draw(valid_input_shapes(spec))
    p = plan(spec, shape)
    assert p.output_shape == (shape[0], spec.out_channels, *shape[2:])
    for before, after in zip(p.transitions, p.transitions[1:]):
        assert after.in_shape == before.out_shape
    for t in p.transitions:
        if t.skip_shape is not None:
            assert t.skip_shape[1:] == t.in_shape[1:]
            assert t.in_shape[0] + t.skip_shape[0] == t.step.in_channels
        elif t.step.op is not Op.CONV_IN:
            assert t.in_shape[0] == t.step.in_channels
    assert sum(t.step.gives_skip for t in p.transitions) == sum(t.step.takes_skip for t in p.transitions)


@pytest.mark.parametrize(("shape", "fragments"), [
    ((1, 8, 256, 256), ["x: expected 5 dimensions", "got 4", "x.unsqueeze(0)"]),
    ((1, 1, 1, 8, 256, 256), ["x: expected 5 dimensions", "got 6"]),
    ((1, 3, 8, 256, 256), ["x: expected 1 channel(s)", "got 3", "UNetSpec.in_channels"]),
    ((1, 1, 10, 256, 256), ["x: expected depth to be a multiple of 8", "got depth 10", "depth 8 or 16", "nearest valid sizes"]),
    ((1, 1, 8, 250, 256), ["x: expected height to be a multiple of 16", "got height 250", "240 or 256"]),
    ((1, 1, 8, 256, 8), ["x: expected width to be a multiple of 16", "got width 8", "width 16"]),
    ((0, 1, 8, 256, 256), ["x: expected every axis to be non-empty", "batch = 0"]),
])
def test_input_shapes_that_cannot_work_are_rejected_before_planning(shape, fragments):
    with pytest.raises(InputError) as caught:
        plan(UNetSpec.default(), shape)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("text", "fragment"), [
    ("Down-{1,8,256,256 ->(conv_in)-> ??}", "unexpected '??}'"),
    ("1,8,256,256 ->(conv_in)-> 32,8,256,256", "expected a section"),
    ("Down-{->(conv_in)-> 32,8,256,256}", "has no input shape"),
    ("Down-{1,8,256,256 ->(conv_in)->}", "ends in the middle"),
    ("Mid-{[256,1,16,16 ->(res)-> 256,1,16,16] -> [128,1,16,16 ->(res)-> 128,1,16,16]}", "differs from it"),
])
def test_malformed_trace_text_is_rejected(text, fragment):
    with pytest.raises(TraceNotationError) as caught:
        parse_trace(text)
    assert fragment in str(caught.value)
