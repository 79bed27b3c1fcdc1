import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import MultiHeadSelfAttention3D, ShapeContractError, attention
from cpcbm_blocks.blocks.attention import reference_attention

from ..conftest import randomize_


@given(batch=st.integers(1, 2), heads=st.integers(1, 4), n=st.integers(1, 17), m=st.integers(1, 9),
       e=st.sampled_from([2, 8]), masked=st.booleans())
def test_the_attention_function_equals_the_plain_formula(batch, heads, n, m, e, masked):
    generator = torch.Generator().manual_seed(n * 31 + m)
    q, k, v = (torch.randn(batch, heads, length, e, generator=generator) for length in (n, m, m))
    mask = None
    if masked:
        mask = torch.rand(batch, m, generator=generator) > 0.4
        mask[:, 0] = True  # keep one key per row: a fully masked row is undefined in both forms
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def _block(channels=16, head_channels=4):
    torch.manual_seed(0)
    return MultiHeadSelfAttention3D(channels=channels, head_channels=head_channels, num_groups=4)


def test_heads_are_given_as_channels_per_head():
    assert MultiHeadSelfAttention3D(channels=256, head_channels=8, num_groups=32).num_heads == 32


def test_a_fresh_block_is_the_identity():
    x = torch.randn(2, 16, 2, 3, 3)
    torch.testing.assert_close(_block()(x), x)


def test_the_block_is_equivariant_to_any_permutation_of_the_voxels():
    block = randomize_(_block(), scale=0.3)
    x = torch.randn(2, 16, 2, 3, 4)
    permutation = torch.randperm(2 * 3 * 4, generator=torch.Generator().manual_seed(1))

    def permute(volume):
        flat = volume.flatten(2)[:, :, permutation]
        return flat.reshape(volume.shape)

    torch.testing.assert_close(block(permute(x)), permute(block(x)), rtol=1e-5, atol=1e-5)


@given(batch=st.integers(1, 2), depth=st.integers(1, 3), size=st.integers(1, 5), head_channels=st.sampled_from([2, 4, 8]))
def test_shapes_under_hypothesis(batch, depth, size, head_channels):
    x = torch.randn(batch, 16, depth, size, size)
    assert randomize_(_block(head_channels=head_channels))(x).shape == x.shape


def test_gradient_reaches_every_parameter():
    block = randomize_(_block())
    block(torch.randn(2, 16, 1, 3, 3)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_wrong_channels_raise_our_contract_error():
    with pytest.raises(ShapeContractError, match="MultiHeadSelfAttention3D.forward"):
        _block()(torch.randn(1, 8, 1, 3, 3))
