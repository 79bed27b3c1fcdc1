import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cpcbm_blocks import ResBlock3D, ShapeContractError, TimestepInjection
from cpcbm_blocks.blocks import resblock as resblock_module
from cpcbm_blocks.memory import _Recorder
from cpcbm_blocks.rematerialize import rematerialized_saves

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


def _formula(block, x, emb):
    """The block written out with torch.nn.functional: the additive injection is its own `h + e`."""
    groups = block.norm1.num_groups
    h = F.conv3d(F.silu(F.group_norm(x, groups, block.norm1.weight, block.norm1.bias)), block.conv1.weight,
                 block.conv1.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_proj[1].weight, block.emb_proj[1].bias)[:, :, None, None, None]
    if block.timestep_injection is TimestepInjection.ADD:
        h = F.group_norm(h + e, groups, block.norm2.weight, block.norm2.bias)
    else:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, groups, block.norm2.weight, block.norm2.bias) * (1 + scale) + shift
    h = F.conv3d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    return F.conv3d(x, block.skip.weight, block.skip.bias) + h


@pytest.mark.parametrize("batch", [1, 2])  # one sample: the additive embedding joins conv1's bias
@pytest.mark.parametrize("injection", list(TimestepInjection))
def test_output_and_gradients_match_the_formula_written_with_torch_functional(injection, batch):
    block = randomize_(_block(out_channels=12, timestep_injection=injection))
    x, emb = torch.randn(batch, 8, 3, 4, 4, requires_grad=True), torch.randn(batch, 6, requires_grad=True)
    inputs = [x, emb, *block.parameters()]
    out, reference = block(x, emb), _formula(block, x, emb)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, theirs.abs().max().item()))


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


class _ShapesMade(TorchDispatchMode):
    """Every shape an operator returned, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _step_with_gradients(block, x, skip, emb, *, apart, saves):
    """Output and the gradients of x, skip and every parameter, with the skip given apart or concatenated."""
    x, skip = x.detach().requires_grad_(), skip.detach().requires_grad_()
    block.zero_grad()
    context = contextlib.nullcontext() if saves is None else rematerialized_saves(products=saves == "products")
    with context, _ShapesMade() as made:
        out = block(x, emb, skip=skip) if apart else block(torch.cat([x, skip], dim=1), emb)
        out.square().sum().backward()
    return [out, x.grad, skip.grad, *(p.grad for p in block.parameters())], made.shapes


@pytest.fixture
def apart_at_any_size(monkeypatch):
    """Take skips apart however small the test's tensors are."""
    monkeypatch.setattr(resblock_module, "SKIP_APART_MIN_BYTES", 0)


@pytest.mark.usefixtures("apart_at_any_size")
@pytest.mark.parametrize("saves", [None, "recipes", "products"])
@pytest.mark.parametrize(("injection", "with_emb"), [(TimestepInjection.ADD, True),
                                                     (TimestepInjection.SCALE_SHIFT, True),
                                                     (TimestepInjection.ADD, False)])
def test_a_skip_given_apart_equals_the_concatenation_and_the_concatenation_is_never_made(injection, with_emb, saves):
    block = randomize_(_block(in_channels=12, out_channels=4, timestep_injection=injection,
                              emb_channels=6 if with_emb else None))
    x, skip, emb = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 9, 4, 5, 6), torch.randn(2, 6) if with_emb else None
    apart, shapes_apart = _step_with_gradients(block, x, skip, emb, apart=True, saves=saves)
    joined, shapes_joined = _step_with_gradients(block, x, skip, emb, apart=False, saves=saves)
    for a, b in zip(apart, joined, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
    concatenated = (2, 12, 4, 5, 6)
    assert concatenated in shapes_joined and concatenated not in shapes_apart


@pytest.mark.usefixtures("apart_at_any_size")
@pytest.mark.usefixtures("one_weight_gradient_form")
@pytest.mark.parametrize("products", [False, True])
def test_a_decoder_blocks_backward_remakes_one_parts_activation_at_a_time(products):
    """Live tensors in backward, counted in part-sized units (x and skip are one each and not counted).

    At most 7: the output and its gradient, conv1's remade output, one remade activation and the
    gradients on their way. Before, both parts' activations were remade together for conv1's
    output, and the residual's backward made x's and skip's gradients before the main branch ran: 9."""
    block = randomize_(_block(in_channels=16, out_channels=8, emb_channels=6))
    x, skip = torch.randn(1, 8, 4, 16, 16, requires_grad=True), torch.randn(1, 8, 4, 16, 16, requires_grad=True)
    emb = torch.randn(1, 6)
    recorder = _Recorder()
    recorder.exclude([*block.parameters(), x, skip, emb])
    with recorder:
        with rematerialized_saves(products=products):
            out = block(x, emb, skip=skip)
        gradient = torch.ones_like(out)
        recorder.set_phase("backward")
        out.backward(gradient)
    part_bytes = x.numel() * x.element_size()
    assert recorder.peak_by_phase["backward"] <= 7.1 * part_bytes, recorder.peak_by_phase["backward"] / part_bytes


@pytest.mark.usefixtures("apart_at_any_size")
@pytest.mark.parametrize(("channels", "out_channels"), [((2, 6), 4), ((4, 4), 8)])  # a group straddles; identity skip
def test_a_skip_that_cannot_run_apart_is_concatenated(channels, out_channels):
    block = randomize_(_block(in_channels=8, out_channels=out_channels, num_groups=2))
    x, skip, emb = torch.randn(1, channels[0], 2, 4, 4), torch.randn(1, channels[1], 2, 4, 4), torch.randn(1, 6)
    apart, _ = _step_with_gradients(block, x, skip, emb, apart=True, saves="recipes")
    joined, _ = _step_with_gradients(block, x, skip, emb, apart=False, saves="recipes")
    for a, b in zip(apart, joined, strict=True):
        torch.testing.assert_close(a, b)


def test_a_skip_is_taken_apart_only_where_the_concatenation_reaches_the_threshold(monkeypatch):
    block = _block(in_channels=8, out_channels=4)
    x, skip = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 2, 8, 8)  # concatenated: 8 * 128 * 4 = 4096 bytes
    for threshold, apart in ((4097, False), (4096, True)):
        monkeypatch.setattr(resblock_module, "SKIP_APART_MIN_BYTES", threshold)
        assert len(block._input_parts(x, skip)) == (2 if apart else 1)


def test_channels_of_x_and_skip_that_do_not_add_up_to_in_channels_raise_our_contract_error():
    block = _block(in_channels=12, out_channels=4)
    with pytest.raises(ShapeContractError, match=r"expected 12 input channels in all \(in_channels\), got x with 4 "
                                                 r"and skip with 4"):
        block(torch.randn(1, 4, 2, 4, 4), torch.randn(1, 6), skip=torch.randn(1, 4, 2, 4, 4))
    with pytest.raises(ShapeContractError, match="ResBlock3D.forward"):  # skip's volume must be x's
        block(torch.randn(1, 4, 2, 4, 4), torch.randn(1, 6), skip=torch.randn(1, 8, 2, 4, 5))


class _BroadcastAdds(TorchDispatchMode):
    """Counts `add`s with an operand shaped `(b, c, 1, 1, 1)`: a per-sample vector added over a volume."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.add:
            self.count += any(isinstance(a, torch.Tensor) and a.dim() == 5 and a.shape[2:] == (1, 1, 1) for a in args)
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("apart_at_any_size")
@pytest.mark.parametrize("saves", [None, "recipes", "products"])
@pytest.mark.parametrize("apart", [False, True])
def test_one_samples_additive_embedding_is_added_inside_conv1s_bias_not_over_the_volume(apart, saves):
    block = randomize_(_block(in_channels=12, out_channels=4))
    x, skip, emb = torch.randn(1, 4, 4, 5, 6), torch.randn(1, 8, 4, 5, 6), torch.randn(1, 6, requires_grad=True)
    ours, _ = _step_with_gradients(block, x, skip, emb, apart=apart, saves=saves)
    ours, emb_grad = [t.clone() for t in ours], emb.grad  # the parameters' gradients accumulate in place
    emb.grad = None
    with _BroadcastAdds() as adds:
        block(torch.cat([x, skip], dim=1), emb, skip=None).square().sum().backward()
    assert adds.count == 0 and torch.equal(emb.grad, emb_grad)
    block.zero_grad()
    joined = torch.cat([x, skip], dim=1).requires_grad_()
    reference = _formula(block, joined, emb)
    reference.square().sum().backward()
    expected = [reference, joined.grad[:, :4], joined.grad[:, 4:], *(p.grad for p in block.parameters())]
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
    with _BroadcastAdds() as adds:  # two samples keep the add: a bias is one vector for the whole batch
        block(torch.randn(2, 12, 4, 5, 6), torch.randn(2, 6))
    assert adds.count == 1
