import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cpcbm_blocks.blocks.gated_residual import gated_residual, per_channel_dot


def _plain(x, gate, u):
    return x + torch.tanh(gate)[None, :, None, None, None] * u


@given(batch=st.integers(0, 2), channels=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       channels_last=st.booleans(), needs=st.sampled_from([(True, True, True), (False, True, False),
                                                            (True, False, True), (False, False, True)]))
def test_values_and_gradients_are_those_of_the_plain_expression(batch, channels, spatial, channels_last, needs):
    generator = torch.Generator().manual_seed(batch * 100 + channels * 10 + len(spatial))
    shape = (batch, channels, *spatial)
    x, gate, u = (torch.randn(s, generator=generator, dtype=torch.float64) for s in (shape, (channels,), shape))
    if channels_last:
        x, u = x.contiguous(memory_format=torch.channels_last_3d), u.contiguous(memory_format=torch.channels_last_3d)
    inputs = [t.requires_grad_(need) for t, need in zip((x, gate, u), needs)]
    weights = torch.randn(shape, generator=generator, dtype=torch.float64)
    wanted = [t for t in inputs if t.requires_grad]
    ours, plain = gated_residual(*inputs), _plain(*inputs)
    torch.testing.assert_close(ours, plain)
    for got, want in zip(torch.autograd.grad((ours * weights).sum(), wanted),
                         torch.autograd.grad((plain * weights).sum(), wanted), strict=True):
        torch.testing.assert_close(got, want)


class _FullSizeMade(TorchDispatchMode):
    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket is not torch.ops.aten.detach:  # detach: AccumulateGrad's alias
            self.count += sum(tuple(t.shape) == self.shape for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize(("fn", "made"), [(gated_residual, 1), (_plain, 2)])
def test_the_backward_makes_one_full_size_tensor_not_two(fn, made):
    """u's gradient only; the plain expression also makes `grad * u` to sum it into the gate's gradient."""
    x, gate, u = torch.randn(2, 3, 4, 5, 6), torch.randn(3, requires_grad=True), torch.randn(2, 3, 4, 5, 6)
    u.requires_grad_()
    out = fn(x, gate, u)
    gradient = torch.ones_like(out)
    with _FullSizeMade(u.shape) as counter:
        out.backward(gradient)
    assert counter.count == made


def test_per_channel_dot_sums_over_everything_but_the_channels():
    a, b = torch.randn(3, 4, 2, 5, dtype=torch.float64), torch.randn(3, 4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(per_channel_dot(a, b), (a * b).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(per_channel_dot(a[:0], b[:0]), torch.zeros(4, dtype=torch.float64))


def test_mixed_dtypes_keep_pytorchs_type_promotion():
    x, u = torch.randn(1, 2, 3, 1, 1, dtype=torch.bfloat16), torch.randn(1, 2, 3, 1, 1, dtype=torch.bfloat16)
    gate = torch.randn(2, requires_grad=True)
    out = gated_residual(x, gate, u)
    assert out.dtype == _plain(x, gate, u).dtype == torch.float32
    torch.testing.assert_close(out, _plain(x, gate, u))
