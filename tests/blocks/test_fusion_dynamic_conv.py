import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import DynamicConvFusion3D, ShapeContractError
from cpcbm_blocks.blocks.fusion_dynamic_conv import naive_dynamic_conv
from cpcbm_blocks.memory import _Recorder
from cpcbm_blocks.rematerialize import rematerialized_saves

from ..conftest import randomize_


def _block(kernel=(3, 3, 3), experts=4, temperature=1.0, channels=8):
    torch.manual_seed(0)
    return DynamicConvFusion3D(channels=channels, num_experts=experts, kernel_size=kernel, temperature=temperature,
                               num_groups=4)


def test_a_fresh_block_is_the_identity():
    x = torch.randn(2, 8, 2, 4, 4)
    torch.testing.assert_close(_block()(x, torch.randn(2, 8, 2, 4, 4)), x)


@given(batch=st.integers(1, 3), kernel=st.sampled_from([(3, 3, 3), (1, 3, 3)]), experts=st.integers(1, 4),
       depth=st.integers(1, 3), size=st.integers(2, 5))
def test_one_grouped_convolution_equals_the_naive_sum_of_expert_convolutions(batch, kernel, experts, depth, size):
    block = _block(kernel, experts)
    x = torch.randn(batch, 8, depth, size, size)
    weights = torch.softmax(torch.randn(batch, experts), dim=-1)  # a different mixture per sample
    fast = block.dynamic_conv(x, weights)
    slow = naive_dynamic_conv(x, block.experts, block.expert_bias, weights)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_gradients_of_the_grouped_form_equal_those_of_the_naive_form():
    block = _block()
    x = torch.randn(3, 8, 2, 4, 4, requires_grad=True)
    logits = torch.randn(3, 4, requires_grad=True)
    grads = []
    for form in (lambda w: block.dynamic_conv(x, w), lambda w: naive_dynamic_conv(x, block.experts, block.expert_bias, w)):
        block.zero_grad()
        x.grad = logits.grad = None
        form(torch.softmax(logits, -1)).square().sum().backward()
        grads.append([g.clone() for g in (x.grad, logits.grad, block.experts.grad, block.expert_bias.grad)])
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_the_forward_matches_the_formula_with_film_and_gate():
    block = randomize_(_block(), scale=0.2)
    x, c = torch.randn(2, 8, 2, 4, 4), torch.randn(2, 8, 2, 4, 4)
    alpha = torch.softmax(block.router(c.mean(dim=(2, 3, 4))), dim=-1)
    u = naive_dynamic_conv(block.norm(x), block.experts, block.expert_bias, alpha)
    gamma, beta = block.film(c).chunk(2, dim=1)
    expected = x + torch.tanh(block.gate)[None, :, None, None, None] * (u * (1 + gamma) + beta)
    torch.testing.assert_close(block(x, c), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("saves", [None, "recipes", "products"])
def test_the_gradients_are_those_of_the_formula(saves):
    block = randomize_(_block(), scale=0.2).double()
    x = torch.randn(2, 8, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 8, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def formula():
        alpha = torch.softmax(block.router(c.mean(dim=(2, 3, 4))), dim=-1)
        u = naive_dynamic_conv(block.norm(x), block.experts, block.expert_bias, alpha)
        gamma, beta = block.film(c).chunk(2, dim=1)
        return x + torch.tanh(block.gate)[None, :, None, None, None] * (u * (1 + gamma) + beta)

    inputs = [x, c, *block.parameters()]
    weights = torch.randn(2, 8, 2, 4, 4, dtype=torch.float64)
    expected = torch.autograd.grad((formula() * weights).sum(), inputs)
    with rematerialized_saves(products=saves == "products") if saves else torch.enable_grad():
        out = block(x, c)
    for got, want in zip(torch.autograd.grad((out * weights).sum(), inputs), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.usefixtures("one_weight_gradient_form")
def test_its_backward_holds_under_seven_full_size_tensors_when_checkpointed():
    """Counted in units of x's size (x and the condition are not counted). Before: 8.2, because
    `addcmul`'s backward scales each factor by its `value` into a full-size copy, the FiLM maps were
    one 2C-channel tensor remade whole for γ alone, and the gate's gradient was a full-size product;
    then 7.2, while autograd's own backward of `u γ` held the remade u and γ with both their gradients
    (`_Modulate` remakes γ, then u: 6.9)."""
    block = randomize_(_block(), scale=0.2)
    x, c = torch.randn(1, 8, 4, 16, 16, requires_grad=True), torch.randn(1, 8, 4, 16, 16, requires_grad=True)
    recorder = _Recorder()
    recorder.exclude([*block.parameters(), x, c])
    with recorder:
        with rematerialized_saves(products=True):
            out = block(x, c)
        gradient = torch.ones_like(out)
        recorder.set_phase("backward")
        out.backward(gradient)
    assert recorder.peak_by_phase["backward"] <= 6.9 * x.numel() * x.element_size()


def test_the_router_is_a_distribution_sharpened_by_a_lower_temperature():
    c = torch.randn(4, 8, 1, 3, 3)
    soft, sharp = (randomize_(_block(temperature=t), scale=1.0).routing(c) for t in (1.0, 0.1))
    torch.testing.assert_close(soft.sum(-1), torch.ones(4))
    assert bool((sharp.max(-1).values >= soft.max(-1).values - 1e-6).all())
    assert not torch.allclose(soft[0], soft[1])  # routing depends on the condition


def test_gradient_reaches_every_parameter():
    block = randomize_(_block(), scale=0.2)
    block(torch.randn(2, 8, 2, 4, 4), torch.randn(2, 8, 2, 4, 4)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_wrong_shapes_raise_our_contract_error():
    with pytest.raises(ShapeContractError, match="DynamicConvFusion3D.forward"):
        _block()(torch.randn(2, 8, 2, 4, 4), torch.randn(2, 4, 2, 4, 4))
