import pytest
import torch

from cpcbm_blocks import CrossAttentionFusion3D, ShapeContractError

from ..conftest import randomize_


def _block():
    torch.manual_seed(0)
    return CrossAttentionFusion3D(channels=8, context_channels=6, head_channels=4, num_groups=4)


def _mask(batch, m, value=True):
    return torch.full((batch, m), value, dtype=torch.bool)


def test_a_fresh_block_is_the_identity():
    x = torch.randn(2, 8, 2, 3, 3)
    torch.testing.assert_close(_block()(x, torch.randn(2, 5, 6), _mask(2, 5)), x)


def test_masked_tokens_have_no_influence():
    block = randomize_(_block(), scale=0.3)
    x, context = torch.randn(2, 8, 1, 3, 3), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, False, True], [True, False, False, False, False]])
    changed = context.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6) * 100
    torch.testing.assert_close(block(x, changed, mask), block(x, context, mask))


def test_a_fully_masked_row_never_gives_nan_and_leaves_that_sample_unchanged():
    block = randomize_(_block(), scale=0.3)
    x = torch.randn(2, 8, 1, 3, 3)
    mask = torch.tensor([[True, False], [False, False]])
    out = block(x, torch.randn(2, 2, 6), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], x[1])
    assert not torch.allclose(out[0], x[0])


def test_one_context_token_gives_the_same_projected_token_at_every_voxel():
    block = randomize_(_block(), scale=0.3)
    x, context = torch.randn(1, 8, 2, 3, 3), torch.randn(1, 1, 6)
    value = block.to_kv(block.context_norm(context))[..., 8:]  # softmax over one key is 1
    update = torch.tanh(block.gate) * block.proj_out(value)[0, 0]
    expected = x + update[None, :, None, None, None]
    torch.testing.assert_close(block(x, context, _mask(1, 1)), expected, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_every_parameter():
    block = randomize_(_block(), scale=0.3)
    block(torch.randn(2, 8, 1, 3, 3), torch.randn(2, 4, 6), _mask(2, 4)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_wrong_shapes_raise_our_contract_error():
    with pytest.raises(ShapeContractError, match="CrossAttentionFusion3D.forward"):
        _block()(torch.randn(2, 8, 1, 3, 3), torch.randn(2, 4, 7), _mask(2, 4))
    with pytest.raises(ShapeContractError, match="CrossAttentionFusion3D.forward"):
        _block()(torch.randn(2, 8, 1, 3, 3), torch.randn(2, 4, 6), _mask(2, 3))
