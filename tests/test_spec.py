import json

import pytest
from hypothesis import given

from cpcbm_blocks import LevelSpec, MidSpec, SpecError, TimestepInjection, UNetSpec
from cpcbm_blocks.spec import FORMAT_VERSION

from .conftest import unet_specs


def test_default_reproduces_the_seed_topology():
    spec = UNetSpec.default()
    assert [lv.channels for lv in spec.levels] == [32, 64, 128, 256]
    assert [lv.num_res_blocks for lv in spec.levels] == [2, 2, 2, 2]
    assert [lv.attention for lv in spec.levels] == [False, False, False, True]
    assert [lv.stride for lv in spec.levels] == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert spec.stride_product == (8, 16, 16)
    assert (spec.mid.num_segments, spec.mid.share_weights, spec.mid.attention) == (2, False, True)
    assert (spec.in_channels, spec.out_channels, spec.head_channels) == (1, 1, 8)


def test_default_refuses_an_unknown_override_and_names_the_valid_ones():
    with pytest.raises(SpecError) as caught:
        UNetSpec.default(base_channels=32)
    message = str(caught.value)
    assert "UNetSpec.default(...)" in message and "['base_channels']" in message
    assert "out_channels" in message and "channels=(...)" in message
    with pytest.raises(SpecError, match="base_channels"):  # and through conditioned(), which passes them on
        UNetSpec.conditioned(base_channels=32)
    assert UNetSpec.default(out_channels=2).out_channels == 2  # a real field still goes through


def test_default_uses_planar_kernels_exactly_where_depth_is_one():
    spec = UNetSpec.default()
    assert [lv.kernel_size for lv in spec.levels] == [(3, 3, 3)] * 3 + [(1, 3, 3)]
    assert spec.mid.kernel_size == (1, 3, 3)
    full = UNetSpec.default(planar_kernels_where_depth_is_one=False)
    assert all(lv.kernel_size == (3, 3, 3) for lv in full.levels) and full.mid.kernel_size == (3, 3, 3)


def test_default_derives_strides_from_the_sample_size():
    spec = UNetSpec.default(sample_size=(16, 64, 32), channels=(32, 32, 32, 32, 32))
    assert [lv.stride for lv in spec.levels] == [(2, 2, 2)] * 4 + [(1, 2, 2)]
    assert UNetSpec.default(sample_size=(1, 32, 32)).levels[0].stride == (1, 2, 2)


def test_json_round_trip_of_the_default():
    spec = UNetSpec.default(timestep_injection=TimestepInjection.SCALE_SHIFT, dropout=0.1)
    text = spec.to_json()
    assert json.loads(text)["format_version"] == FORMAT_VERSION
    assert UNetSpec.from_json(text) == spec


@given(unet_specs())
def test_json_round_trip_of_random_specs(spec):
    assert UNetSpec.from_json(spec.to_json()) == spec
    assert hash(UNetSpec.from_dict(spec.to_dict())) == hash(spec)


def _levels(**changes):
    return (LevelSpec(**{"channels": 32, **changes}),)


@pytest.mark.parametrize(("build", "fragments"), [
    (lambda: UNetSpec(levels=()), ["UNetSpec.levels", "at least one level", "UNetSpec.default()"]),
    (lambda: UNetSpec(levels=_levels(channels=48)), ["levels[0].channels", "multiple of num_groups=32", "48", "32 or 64"]),
    (lambda: UNetSpec(levels=_levels(), head_channels=5), ["head_channels=5", "32", "30 or 35"]),
    (lambda: UNetSpec(levels=_levels(attention=True), num_groups=8, head_channels=5), ["attention=True", "head_channels=5"]),
    (lambda: LevelSpec(channels=32, stride=(2, 2)), ["LevelSpec.stride", "triple of 3 ints", "(2, 2)"]),
    (lambda: LevelSpec(channels=32, stride=(2, 0, 2)), ["LevelSpec.stride (height)", "int >= 1", "0"]),
    (lambda: LevelSpec(channels=32, stride=(2, 2.5, 2)), ["LevelSpec.stride (height)", "2.5"]),
    (lambda: LevelSpec(channels=32, kernel_size=(2, 3, 3)), ["LevelSpec.kernel_size (depth)", "odd kernel size", "2"]),
    (lambda: LevelSpec(channels=0), ["LevelSpec.channels", "int >= 1", "0"]),
    (lambda: LevelSpec(channels=32, num_res_blocks=0), ["LevelSpec.num_res_blocks", "int >= 1", "0"]),
    (lambda: LevelSpec(channels=32, attention="yes"), ["LevelSpec.attention", "a bool", "'yes'"]),
    (lambda: MidSpec(num_segments=0), ["MidSpec.num_segments", "int >= 1", "0"]),
    (lambda: UNetSpec(levels=_levels(), num_groups=0), ["UNetSpec.num_groups", "int >= 1"]),
    (lambda: UNetSpec(levels=_levels(), dropout=1.5), ["UNetSpec.dropout", ">= 0 and < 1", "1.5"]),
    (lambda: UNetSpec(levels=_levels(), timestep_injection="film"), ["timestep_injection", "'add'", "'scale_shift'", "'film'"]),
    (lambda: UNetSpec(levels=LevelSpec(channels=32)), ["UNetSpec.levels", "sequence of LevelSpec"]),
    (lambda: UNetSpec(levels=({"channels": 32},)), ["UNetSpec.levels[0]", "a LevelSpec"]),
    (lambda: UNetSpec.default(attention_levels=(5,)), ["attention_levels", "1..4", "(5,)"]),
    (lambda: UNetSpec.default(sample_size=(8, 100, 100), channels=(32,) * 4), ["sample_size", "halve evenly", "(8, 100, 100)"]),
    (lambda: UNetSpec.from_json('{"levels": [{"channels": 32, "chanels": 3}]}'), ["spec.levels[0]", "chanels"]),
    (lambda: UNetSpec.from_json('{"levels": [], "format_version": 99}'), ["format_version", "99"]),
    (lambda: UNetSpec.from_json("{not json"), ["invalid JSON"]),
    (lambda: UNetSpec.from_json('{"levels": [{"channels": 32}], "colour": 1}'), ["spec", "colour"]),
])
def test_invalid_specs_are_rejected_with_a_message_that_says_what_to_do(build, fragments):
    with pytest.raises(SpecError) as caught:
        build()
    for fragment in fragments:
        assert fragment in str(caught.value)
