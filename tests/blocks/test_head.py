import pytest
import torch

from cpcbm_blocks import OutputHead, ShapeContractError

from ..conftest import randomize_


def test_a_fresh_head_predicts_zero_with_the_output_channels():
    head = OutputHead(in_channels=8, out_channels=2, num_groups=4)
    out = head(torch.randn(2, 8, 2, 4, 4))
    assert out.shape == (2, 2, 2, 4, 4) and not out.any()


def test_gradient_reaches_every_parameter():
    head = randomize_(OutputHead(in_channels=8, out_channels=2, num_groups=4))
    head(torch.randn(2, 8, 2, 4, 4)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_wrong_channels_raise_our_contract_error():
    with pytest.raises(ShapeContractError, match="OutputHead.forward"):
        OutputHead(in_channels=8, out_channels=1, num_groups=4)(torch.randn(1, 4, 2, 4, 4))
