import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import GatedFusion3D, GatedInjection3D, ShapeContractError

from ..conftest import randomize_


def _gmu():
    torch.manual_seed(0)
    return randomize_(GatedFusion3D(channels=6, text_channels=10), scale=0.3)


def _present(batch):
    return torch.ones(batch, dtype=torch.bool)


@given(batch=st.integers(1, 3), depth=st.integers(1, 3), size=st.integers(1, 5), scale=st.sampled_from([0.1, 10.0, 1e3]))
def test_the_gate_stays_in_the_unit_interval(batch, depth, size, scale):
    gmu = _gmu()
    z = gmu.gate(torch.randn(batch, 10) * scale, torch.randn(batch, 6, depth, size, size) * scale)
    assert z.shape == (batch, 6, depth, size, size)
    assert bool((z >= 0).all() and (z <= 1).all())


@pytest.mark.parametrize(("bias", "expect_text"), [(1e4, True), (-1e4, False)])
def test_the_output_reduces_to_either_input_at_the_gates_extremes(bias, expect_text):
    gmu = _gmu()
    with torch.no_grad():
        gmu.gate_text.bias.fill_(bias)
    text, image = torch.randn(2, 10), torch.randn(2, 6, 2, 3, 3)
    out = gmu(text, image, _present(2), _present(2))
    expected = gmu.text_proj(text)[:, :, None, None, None].expand_as(image) if expect_text else image
    torch.testing.assert_close(out, expected)


def test_the_output_is_the_gated_mixture_of_the_formula():
    gmu = _gmu()
    text, image = torch.randn(2, 10), torch.randn(2, 6, 2, 3, 3)
    z = torch.sigmoid(gmu.gate_text(text)[:, :, None, None, None]
                      + torch.einsum("oi,bidhw->bodhw", gmu.gate_image.weight[:, :, 0, 0, 0], image))
    expected = z * gmu.text_proj(text)[:, :, None, None, None] + (1 - z) * image
    torch.testing.assert_close(gmu(text, image, _present(2), _present(2)), expected, rtol=1e-5, atol=1e-5)


def test_an_absent_modality_is_replaced_by_its_learned_null_vector():
    gmu = _gmu()
    text, image = torch.randn(2, 10), torch.randn(2, 6, 2, 3, 3)
    absent = torch.tensor([False, True])
    out = gmu(text, image, absent, absent)
    null_text = gmu.null_text.expand(2, -1)
    null_image = gmu.null_image[None, :, None, None, None].expand_as(image)
    reference = gmu(null_text, null_image, _present(2), _present(2))
    torch.testing.assert_close(out[0], reference[0])
    torch.testing.assert_close(out[1], gmu(text, image, _present(2), _present(2))[1])


def test_gradient_reaches_every_parameter_including_the_null_vectors():
    gmu = _gmu()
    out = gmu(torch.randn(2, 10), torch.randn(2, 6, 1, 3, 3), torch.tensor([True, False]), torch.tensor([False, True]))
    out.square().sum().backward()
    for name, parameter in gmu.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gated_injection_is_the_identity_at_init_and_matches_its_formula_after():
    torch.manual_seed(0)
    block = GatedInjection3D(channels=6)
    x, c = torch.randn(2, 6, 2, 3, 3), torch.randn(2, 6, 2, 3, 3)
    torch.testing.assert_close(block(x, c), x)
    randomize_(block, scale=0.5)
    expected = x + torch.tanh(block.gate)[None, :, None, None, None] * block.proj(c)
    torch.testing.assert_close(block(x, c), expected)
    block(x, c).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_wrong_shapes_raise_our_contract_error():
    with pytest.raises(ShapeContractError, match="GatedFusion3D.forward"):
        _gmu()(torch.randn(2, 9), torch.randn(2, 6, 1, 3, 3), _present(2), _present(2))
    with pytest.raises(ShapeContractError, match="GatedInjection3D.forward"):
        GatedInjection3D(channels=6)(torch.randn(2, 6, 1, 3, 3), torch.randn(2, 6, 1, 3, 4))
