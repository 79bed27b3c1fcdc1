import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import (CpcbmError, InputError, MidSpec, ShapeContractError, TraceMismatchError, UNet3D, UNetSpec,
                          parse_trace, plan, record_trace, shape_checks)

from .conftest import ROOT, randomize_, seed_trace_text, unet_specs, valid_input_shapes

SEED_INPUT = (1, 1, 8, 256, 256)


@pytest.fixture(scope="module")
def meta_default():
    with torch.device("meta"):
        return UNet3D(UNetSpec.default())


def test_the_default_unet_on_meta_reproduces_the_seed_trace(meta_default):
    x = torch.empty(SEED_INPUT, device="meta")
    with record_trace(meta_default) as trace:
        out = meta_default(x, 500)
    assert out.shape == SEED_INPUT
    assert trace.transitions == list(plan(UNetSpec.default(), SEED_INPUT).transitions)
    assert [t.key() for t in trace.transitions if not t.step.beyond_seed] == parse_trace(seed_trace_text())


@pytest.mark.slow
def test_a_real_full_size_cpu_forward_of_the_default_unet_follows_the_trace():
    torch.manual_seed(0)
    model = randomize_(UNet3D(UNetSpec.default()), scale=0.02).eval()
    with record_trace(model) as trace, torch.no_grad():
        out = model(torch.randn(SEED_INPUT), torch.tensor([250.0]))
    assert out.shape == SEED_INPUT and torch.isfinite(out).all()
    assert [t.key() for t in trace.transitions if not t.step.beyond_seed] == parse_trace(seed_trace_text())


def test_forward_and_backward_at_a_small_size_reach_every_parameter():
    torch.manual_seed(0)
    model = randomize_(UNet3D(UNetSpec.default()), scale=0.02)
    x = torch.randn(2, 1, 8, 32, 32)
    with record_trace(model) as trace:
        out = model(x, torch.tensor([10, 900]))
    out.square().mean().backward()
    assert trace.transitions == list(plan(model.spec, tuple(x.shape)).transitions)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_a_fresh_unet_predicts_zero_and_accepts_every_timestep_form(tiny_spec):
    model = UNet3D(tiny_spec)
    x = torch.randn(2, 1, 4, 8, 8)
    for t in (7, 7.5, torch.tensor(7), torch.tensor([7.0, 8.0]), torch.tensor([7, 8], dtype=torch.int64)):
        out = model(x, t)
        assert out.shape == x.shape and not out.any()


def test_modules_are_registered_once_under_names_that_read_like_the_trace(meta_default):
    names = list(meta_default.blocks.keys())
    assert names[:4] == ["conv_in", "down1_res1", "down1_res2", "down1_down"]
    assert "down4_attn2" in names and "mid2_attn" in names and names[-1] == "head"
    assert len(names) == len(set(names)) == len(meta_default.steps)


def test_shared_mid_weights_register_one_segment_and_keep_the_trace(tiny_spec):
    shared = UNetSpec(**{**tiny_spec.__dict__, "mid": MidSpec(share_weights=True, kernel_size=(1, 3, 3))})
    separate, together = UNet3D(tiny_spec), UNet3D(shared)
    per_segment = sum(p.numel() for k, m in separate.blocks.items() if k.startswith("mid2") for p in m.parameters())
    assert sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in together.parameters()) == per_segment
    x = torch.randn(1, 1, 4, 8, 8)
    assert plan(shared, x.shape).transitions[-1].out_shape == plan(tiny_spec, x.shape).transitions[-1].out_shape
    together(x, 3)


@pytest.mark.parametrize(("x", "t", "fragments"), [
    (torch.randn(1, 4, 8, 8), 5, ["x: expected 5 dimensions", "x.unsqueeze(0)"]),
    (torch.randn(1, 2, 4, 8, 8), 5, ["x: expected 1 channel(s)", "got 2"]),
    (torch.zeros(1, 1, 4, 8, 8, dtype=torch.int64), 5, ["x: expected a floating-point tensor", "torch.int64", "x.float()"]),
    (torch.zeros(1, 1, 4, 8, 8, dtype=torch.bool), 5, ["x: expected a floating-point tensor", "torch.bool"]),
    (torch.randn(1, 1, 3, 8, 8), 5, ["x: expected depth to be a multiple of 2", "got depth 3", "depth 2 or 4"]),
    (torch.randn(1, 1, 4, 8, 6), 5, ["x: expected width to be a multiple of 4", "got width 6", "width 4 or 8"]),
    (torch.randn(1, 1, 4, 0, 8), 5, ["x: expected every axis to be non-empty", "height = 0"]),
    (torch.randn(2, 1, 4, 8, 8), torch.tensor([1.0, 2.0, 3.0]), ["t: expected shape () or (2,)", "got (3,)"]),
    (torch.randn(2, 1, 4, 8, 8), torch.zeros(2, 1), ["t: expected shape () or (2,)", "got (2, 1)"]),
    (torch.randn(1, 1, 4, 8, 8), float("inf"), ["t: expected finite, non-negative timesteps"]),
    ([[0.0]], 5, ["x: expected a torch.Tensor", "got list"]),
])
def test_inputs_that_cannot_work_are_rejected_before_any_compute(tiny_spec, x, t, fragments):
    model = UNet3D(tiny_spec)
    calls = []
    model.blocks["conv_in"].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(InputError) as caught:
        model(x, t)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert calls == [], "the input was rejected only after compute had started"


def test_the_checks_are_live_a_wrong_block_output_raises_naming_the_transition(tiny_spec):
    model = UNet3D(tiny_spec)
    model.blocks["up2_up"].forward = lambda x: torch.nn.functional.interpolate(x, scale_factor=(2, 2, 2))
    with pytest.raises(TraceMismatchError) as caught:
        model(torch.randn(1, 1, 4, 8, 8), 5)
    message = str(caught.value)
    assert "up level 2, step 1 (up)" in message
    assert "expected 16,2,2,2 ->(up)-> 16,2,4,4" in message and "got 16,2,2,2 ->(up)-> 16,4,4,4" in message


def test_the_checks_are_live_a_block_given_the_wrong_channels_raises_its_contract_error(tiny_spec):
    model = UNet3D(tiny_spec)
    with pytest.raises(ShapeContractError, match="ResBlock3D.forward"):
        model.blocks["down1_res1"](torch.randn(1, 3, 2, 4, 4), torch.randn(1, 16))


def test_checks_switch_off_at_run_time(tiny_spec):
    model = UNet3D(tiny_spec)
    model.blocks["up2_up"].forward = lambda x: torch.nn.functional.interpolate(x, scale_factor=(2, 2, 2))
    with shape_checks(False):
        with pytest.raises(RuntimeError) as caught:  # the wrong shape now reaches torch.cat unguarded
            model(torch.randn(1, 1, 4, 8, 8), 5)
    assert not isinstance(caught.value, CpcbmError)
    with pytest.raises(TraceMismatchError):
        model(torch.randn(1, 1, 4, 8, 8), 5)


def test_checks_compile_out_entirely_with_the_environment_variable():
    code = ("import cpcbm_blocks as c, torch;"
            "assert not c.contracts.CHECKS_AT_IMPORT;"
            "assert c.ResBlock3D.forward.__code__.co_name == 'forward';"
            "m = c.UNet3D(c.UNetSpec.default());"
            "print(tuple(m(torch.randn(1, 1, 8, 16, 16), 3).shape))")
    env = {**os.environ, "CPCBM_SHAPE_CHECKS": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 1, 8, 16, 16)"


@given(st.data())
def test_random_specs_run_on_meta_with_the_recorded_trace_equal_to_the_plan(data):
    spec = data.draw(unet_specs())
    shape = data.draw(valid_input_shapes(spec))
    with torch.device("meta"):
        model = UNet3D(spec)
    with record_trace(model) as trace:
        out = model(torch.empty(shape, device="meta"), data.draw(st.integers(0, 999)))
    assert out.shape == (shape[0], spec.out_channels, *shape[2:])
    assert trace.transitions == list(plan(spec, shape).transitions)


@given(st.data())
def test_random_invalid_inputs_raise_our_error_never_a_torch_error(data):
    spec = data.draw(unet_specs(max_levels=3))
    shape = list(data.draw(valid_input_shapes(spec)))
    axis = data.draw(st.integers(1, 4))
    shape[axis] += data.draw(st.integers(1, 3))
    if axis > 1:  # a spatial size that is still a multiple of its stride product would be valid
        from hypothesis import assume
        assume(shape[axis] % spec.stride_product[axis - 2] != 0)
    with torch.device("meta"):
        model = UNet3D(spec)
    with pytest.raises(InputError):
        model(torch.empty(shape, device="meta"), 1)
