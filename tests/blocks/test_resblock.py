import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import ResBlock3D, ShapeContractError, TimestepInjection

from ..conftest import randomize_


def _block(**overrides):
    torch.manual_seed(0)
    return ResBlock3D(**{"in_channels": 8, "out_channels": 8, "emb_channels": 6, "num_groups": 4, **overrides})


@given(batch=st.integers(1, 2), c_in=st.sampled_from([4, 8]), c_out=st.sampled_from([4, 12]),
       depth=st.integers(1, 3), size=st.integers(2, 6), kernel=st.sampled_from([(3, 3, 3), (1, 3, 3)]),
       injection=st.sampled_from(list(TimestepInjection)))
def test_shapes_under_hypothesis(batch, c_in, c_out, depth, size, kernel, injection):
    block = ResBlock3D(in_channels=c_in, out_channels=c_out, emb_channels=5, num_groups=4, kernel_size=kernel,
                       timestep_injection=injection)
    assert block(torch.randn(batch, c_in, depth, size, size), torch.randn(batch, 5)).shape == (batch, c_out, depth, size, size)


@pytest.mark.parametrize("injection", list(TimestepInjection))
def test_a_fresh_block_is_the_identity_when_channels_are_kept(injection):
    block = _block(timestep_injection=injection)
    x = torch.randn(2, 8, 2, 5, 5)
    torch.testing.assert_close(block(x, torch.randn(2, 6)), x)


def test_a_fresh_block_is_its_skip_projection_when_channels_change():
    block = _block(out_channels=12)
    x = torch.randn(2, 8, 2, 5, 5)
    torch.testing.assert_close(block(x, torch.randn(2, 6)), block.skip(x))


@pytest.mark.parametrize("injection", list(TimestepInjection))
def test_output_matches_the_formula_written_with_torch_functional(injection):
    block = randomize_(_block(out_channels=12, timestep_injection=injection))
    x, emb = torch.randn(2, 8, 3, 4, 4), torch.randn(2, 6)
    h = F.conv3d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias)), block.conv1.weight, block.conv1.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_proj[1].weight, block.emb_proj[1].bias)[:, :, None, None, None]
    if injection is TimestepInjection.ADD:
        h = F.group_norm(h + e, 4, block.norm2.weight, block.norm2.bias)
    else:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, 4, block.norm2.weight, block.norm2.bias) * (1 + scale) + shift
    h = F.conv3d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    skip = F.conv3d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, emb), skip + h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("injection", list(TimestepInjection))
def test_gradient_reaches_every_parameter(injection):
    block = randomize_(_block(out_channels=12, timestep_injection=injection))
    block(torch.randn(2, 8, 2, 4, 4), torch.randn(2, 6)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_wrong_channels_or_embedding_width_raise_our_contract_error():
    block = _block()
    with pytest.raises(ShapeContractError, match="ResBlock3D.forward"):
        block(torch.randn(1, 4, 2, 4, 4), torch.randn(1, 6))
    with pytest.raises(ShapeContractError, match="ResBlock3D.forward"):
        block(torch.randn(1, 8, 2, 4, 4), torch.randn(1, 7))
    with pytest.raises(ShapeContractError, match="4 dimensions"):
        block(torch.randn(8, 2, 4, 4), torch.randn(1, 6))
    with pytest.raises(ShapeContractError, match="ResBlock3D.forward"):
        block(torch.randn(2, 8, 2, 4, 4), torch.randn(3, 6))
