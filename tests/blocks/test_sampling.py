import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import Downsample3D, InputError, ShapeContractError, Upsample3D, shape_checks

from ..conftest import randomize_

strides = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@given(stride=strides, multiples=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       batch=st.integers(1, 2))
def test_down_then_up_round_trips_shapes_for_every_stride_tuple(stride, multiples, batch):
    shape = (batch, 4, *(s * m for s, m in zip(stride, multiples)))
    kernel = tuple(3 if s > 1 else 1 for s in stride)
    down = Downsample3D(channels=4, stride=stride, kernel_size=kernel)
    up = Upsample3D(channels=4, stride=stride, kernel_size=(3, 3, 3))
    x = torch.randn(shape)
    y = down(x)
    assert y.shape == (batch, 4, *multiples)
    assert up(y).shape == x.shape


def _delta_kernel_(conv):
    """Make a convolution the identity map: 1 at the kernel centre on the diagonal, bias 0."""
    with torch.no_grad():
        conv.weight.zero_()
        centre = tuple(k // 2 for k in conv.kernel_size)
        for c in range(conv.out_channels):
            conv.weight[(c, c, *centre)] = 1.0
        conv.bias.zero_()


@pytest.mark.parametrize("stride", [(2, 2, 2), (1, 2, 2), (2, 1, 3)])
def test_down_with_an_identity_kernel_subsamples_every_stride_th_voxel(stride):
    down = Downsample3D(channels=3, stride=stride)
    _delta_kernel_(down.conv)
    x = torch.randn(1, 3, 4, 6, 6)
    torch.testing.assert_close(down(x), x[:, :, :: stride[0], :: stride[1], :: stride[2]])


@pytest.mark.parametrize("stride", [(2, 2, 2), (1, 2, 2), (3, 1, 2)])
def test_up_with_an_identity_kernel_repeats_each_voxel_stride_times(stride):
    up = Upsample3D(channels=3, stride=stride)
    _delta_kernel_(up.conv)
    x = torch.randn(1, 3, 2, 3, 3)
    expected = x.repeat_interleave(stride[0], 2).repeat_interleave(stride[1], 3).repeat_interleave(stride[2], 4)
    torch.testing.assert_close(up(x), expected)


def test_gradient_reaches_every_parameter():
    for block in (Downsample3D(channels=4, stride=(1, 2, 2)), Upsample3D(channels=4, stride=(1, 2, 2))):
        randomize_(block)(torch.randn(1, 4, 2, 4, 4)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_sizes_that_do_not_divide_by_the_stride_are_refused_before_the_convolution():
    # the convolution would round 3 slices down to 1 in silence; the return contract would only catch it after
    with pytest.raises(InputError, match=r"Downsample3D.forward: x: expected .* multiples of the stride \(2, 2, 2\), "
                                         r"got \(3, 4, 4\)"):
        Downsample3D(channels=4, stride=(2, 2, 2))(torch.randn(1, 4, 3, 4, 4))
    with pytest.raises(InputError, match=r"got \(4, 5, 4\)"), shape_checks(False):
        Downsample3D(channels=4, stride=(1, 2, 2))(torch.randn(1, 4, 4, 5, 4))
    with pytest.raises(ShapeContractError, match="Upsample3D.forward"):
        Upsample3D(channels=4)(torch.randn(1, 5, 2, 2, 2))
