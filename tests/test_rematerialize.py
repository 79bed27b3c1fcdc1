"""Rematerialised saves: the same gradients, less held for backward, and a loud error rather than a wrong one."""

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cpcbm_blocks import ResBlock3D
from cpcbm_blocks.measure import held_for_backward, malloc_bytes_in_use
from cpcbm_blocks.rematerialize import (
    SavedApart,
    _Held,
    _Packed,
    can_rematerialize,
    recomputable,
    recomputable_product,
    remaking_products,
    rematerialized_saves,
    rematerializing,
    saves_apart,
)

from .conftest import randomize_


def _chain(x: torch.Tensor, weight: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """silu(norm(x)) into a convolution: the pattern of a residual block."""
    a = recomputable(F.silu, recomputable(norm, x))
    return F.conv3d(a, weight, padding=1)


def _grads(fn, *leaves):
    for leaf in leaves:
        leaf.grad = None
    out = fn()
    out.square().sum().backward()
    return out.detach(), [leaf.grad.clone() for leaf in leaves]


def _leaves(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 3, 6, 6, generator=generator).requires_grad_()
    weight = (0.1 * torch.randn(4, 8, 3, 3, 3, generator=generator)).requires_grad_()
    norm = torch.nn.GroupNorm(2, 8)
    return x, weight, norm


def test_a_chain_of_recipes_gives_the_plain_gradients():
    x, weight, norm = _leaves()
    plain_out, plain = _grads(lambda: _chain(x, weight, norm), x, weight, norm.weight)

    def rematerialized():
        with rematerialized_saves():
            assert rematerializing()
            return _chain(x, weight, norm)

    out, grads = _grads(rematerialized, x, weight, norm.weight)
    torch.testing.assert_close(out, plain_out)
    for got, expected in zip(grads, plain, strict=True):
        torch.testing.assert_close(got, expected)


def test_the_convolution_saves_a_recipe_not_its_input():
    x, weight, norm = _leaves()
    saved = []
    # An outer hook sees what the inner context packs: the recipe stands where the tensor would.
    with rematerialized_saves():
        registry_pack = torch._C._autograd._top_saved_tensors_default_hooks(False)[0]

        def spy(tensor):
            packed = registry_pack(tensor)
            saved.append(packed)
            return packed

        with torch.autograd.graph.saved_tensors_hooks(spy, registry_pack.__self__.unpack):
            y = _chain(x, weight, norm)
    remade = [p for p in saved if isinstance(p, _Packed)]
    held = [p.tensor for p in saved if isinstance(p, _Held)]
    assert len(remade) + len(held) == len(saved)
    # silu's input (the norm output) and the conv's input (silu's output) are recipes; of the
    # activation-sized tensors only x, the norm's input, is held, as autograd would hold it.
    assert len(remade) == 2
    assert [p.data_ptr() for p in held if p.numel() == x.numel()] == [x.data_ptr()]
    y.sum().backward()
    assert x.grad is not None


def test_a_saved_view_of_a_recipe_is_remade_as_that_view():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 5, generator=generator).requires_grad_()
    b = torch.randn(2, 4, 5, generator=generator).requires_grad_()

    def fn():
        both = recomputable(torch.cat, [a, b], dim=1)
        # sin saves its input: a strided slice of the concatenation, neither contiguous nor at offset 0
        return both[:, 2:6, 1:].sin() * both[:, :, ::2].sum()

    plain_out, plain = _grads(fn, a, b)

    def rematerialized():
        with rematerialized_saves():
            return fn()

    out, grads = _grads(rematerialized, a, b)
    torch.testing.assert_close(out, plain_out)
    for got, expected in zip(grads, plain, strict=True):
        torch.testing.assert_close(got, expected)


def test_an_argument_modified_in_place_raises_rather_than_giving_wrong_gradients():
    x, weight, _ = _leaves()
    h = x * 2  # not a leaf: it can be modified in place
    with rematerialized_saves():
        y = F.conv3d(recomputable(F.silu, h), weight, padding=1)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match=r"recomputable\(silu\).*modified in place.*rematerialized_saves"):
        y.sum().backward()


@pytest.mark.parametrize("context", ["no_grad", "autocast", "checkpoint"])
def test_it_steps_aside_where_saved_tensors_are_someone_elses(context):
    x, weight, norm = _leaves()
    seen = []

    def body(x):
        seen.append(can_rematerialize())  # UNet3D asks this first, and falls back to a selective checkpoint
        with rematerialized_saves():
            seen.append(rematerializing())
            return _chain(x, weight, norm)

    if context == "no_grad":
        with torch.no_grad():
            body(x)
    elif context == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            body(x).float().sum().backward()
    else:
        plain_out, plain = _grads(lambda: _chain(x, weight, norm), x, weight)
        out, grads = _grads(lambda: checkpoint(body, x, use_reentrant=False), x, weight)
        torch.testing.assert_close(out, plain_out)
        for got, expected in zip(grads, plain, strict=True):
            torch.testing.assert_close(got, expected)
    assert len(seen) >= 2 and not any(seen)
    assert can_rematerialize()  # and back in plain eager training it applies again
    assert recomputable(torch.add, x, 1).requires_grad  # outside any context: just the call


@pytest.mark.skipif(malloc_bytes_in_use() is None, reason="measuring held bytes needs glibc >= 2.33 (mallinfo2)")
def test_a_residual_block_holds_its_input_and_first_convolution_output_only():
    block = randomize_(ResBlock3D(in_channels=32, out_channels=32, emb_channels=16, num_groups=8), seed=1)
    x = torch.randn(1, 32, 8, 32, 32)  # 1 MiB per activation
    emb = torch.randn(1, 16)
    activation_bytes = x.numel() * x.element_size()

    def rematerialized(x, emb):
        with rematerialized_saves():
            return block(x, emb)

    plain = held_for_backward(block, x, emb)
    held = held_for_backward(rematerialized, x, emb)
    # plain: norm1's input and output, silu's output, conv1's output, the sum, norm2's output, silu's output
    assert plain >= 4 * activation_bytes  # about 5; what malloc reuses moves it a little with the tests run before
    # x itself is the caller's; what the block adds is conv1's output, and small statistics and weights
    assert held <= 1.25 * activation_bytes, (held / activation_bytes, plain / activation_bytes)


def test_a_recipe_that_feeds_two_others_runs_once_per_saved_tensor():
    # The FiLM pattern of DynamicConvFusion3D: two chunks of one map feed two recipes.
    generator = torch.Generator().manual_seed(3)
    condition = torch.randn(2, 4, 6, generator=generator).requires_grad_()
    u = torch.randn(2, 2, 6, generator=generator).requires_grad_()
    gate = torch.randn(2, 1, 1, generator=generator).requires_grad_()
    calls = []

    def film(c):
        calls.append(1)
        return c * 3.0

    def fn():
        gamma, beta = recomputable(film, condition).chunk(2, dim=1)
        modulated = recomputable(torch.addcmul, beta, u, recomputable(torch.add, gamma, 1))
        return gate * modulated  # saves `modulated`, for the gate's gradient

    plain_out, plain = _grads(fn, condition, u, gate)

    def rematerialized():
        with rematerialized_saves():
            return fn()

    calls.clear()
    for leaf in (condition, u, gate):
        leaf.grad = None
    out = rematerialized()
    assert len(calls) == 1  # the forward
    out.square().sum().backward()
    # remaking `modulated` (for the gate) and `1 + gamma` (for the multiply by u): film once each
    assert len(calls) == 3
    torch.testing.assert_close(out.detach(), plain_out)
    for leaf, expected in zip((condition, u, gate), plain, strict=True):
        torch.testing.assert_close(leaf.grad, expected)


def test_with_products_a_convolution_runs_once_in_backward_and_is_let_go_after_its_last_use():
    x, weight, norm = _leaves()
    weight2 = (0.1 * torch.randn(4, 4, 3, 3, 3, generator=torch.Generator().manual_seed(4))).requires_grad_()
    e = torch.randn(2, 4, 1, 1, 1, requires_grad=True)
    made = []

    def conv1(a):
        out = F.conv3d(a, weight, padding=1)
        made.append(weakref.ref(out))
        return out

    def block():  # a residual block's shape: conv2(silu(norm2(conv1(silu(norm1(x))) + e)))
        h = recomputable_product(conv1, recomputable(F.silu, recomputable(norm, x)))
        a2 = recomputable(F.silu, recomputable(F.group_norm, recomputable(torch.add, h, e), 2))
        return F.conv3d(a2, weight2, padding=1)

    plain_out, plain = _grads(block, x, weight, weight2, e)

    def checkpointed():
        with rematerialized_saves(products=True):
            return block()

    for leaf in (x, weight, weight2, e):
        leaf.grad = None
    made.clear()
    out = checkpointed()
    assert len(made) == 1 and made[0]() is None  # conv1's output is not held by the graph
    out.square().sum().backward(retain_graph=True)  # the graph (and its recipes) stay alive
    # three saved tensors need conv1's output (the add's, the norm's and the SiLU's); it ran once for them
    assert len(made) == 2
    assert made[1]() is None  # and was let go after the last of them
    torch.testing.assert_close(out.detach(), plain_out)
    for leaf, expected in zip((x, weight, weight2, e), plain, strict=True):
        torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.skipif(malloc_bytes_in_use() is None, reason="measuring held bytes needs glibc >= 2.33 (mallinfo2)")
def test_with_products_a_residual_block_holds_about_nothing_but_its_input():
    block = randomize_(ResBlock3D(in_channels=32, out_channels=32, emb_channels=16, num_groups=8), seed=1)
    x = torch.randn(1, 32, 8, 32, 32)  # 1 MiB per activation
    emb = torch.randn(1, 16)

    def checkpointed(x, emb):
        with rematerialized_saves(products=True):
            return block(x, emb)

    assert held_for_backward(checkpointed, x, emb) <= 0.25 * x.numel() * x.element_size()


class _Scale(torch.autograd.Function):
    """`a * b` whose backward unpacks b, then a, each through `SavedApart`."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = SavedApart(a), SavedApart(b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        grad_a = grad * ctx.b.unpack()
        return grad_a, grad * ctx.a.unpack()


def test_saved_apart_keeps_a_recipe_remakes_it_when_unpacked_and_frees_it_after():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    b = torch.randn(2, 4, 3, 3, requires_grad=True)
    made = []

    def silu(t):
        out = F.silu(t)
        made.append(weakref.ref(out))
        return out

    with rematerialized_saves():
        assert saves_apart()
        a = recomputable(silu, x)
        out = _Scale.apply(a, b)
    del a
    gc.collect()
    assert made[0]() is None  # the graph keeps the recipe, not the tensor
    out.sum().backward(retain_graph=True)
    assert len(made) == 2 and made[1]() is None  # remade for the backward, then let go
    torch.testing.assert_close(x.grad, (b * torch.autograd.grad(F.silu(x).sum(), x)[0]).detach())
    torch.testing.assert_close(b.grad, F.silu(x).detach())
    out.sum().backward()  # the graph was kept: a second backward remakes it again
    assert len(made) == 3
    with pytest.raises(RuntimeError, match="already freed by an earlier backward.*retain_graph=True"):
        out.sum().backward()


def test_a_forward_whose_output_is_dropped_without_backward_leaves_nothing_allocated():
    """A saved-tensor hook that hands autograd back the tensor itself closes a cycle wherever an
    operator saves one of its own outputs (here GroupNorm its statistics, ReLU its result): the
    node and all it saved outlived the forward, 1 MiB per residual block per forward here. Held
    tensors are detached now; a validation pass left with grad on, or a loss that raises, must not
    grow the process."""
    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    block = randomize_(ResBlock3D(in_channels=32, out_channels=32, emb_channels=16, num_groups=8), seed=1)
    x, emb = torch.randn(1, 32, 8, 32, 32), torch.randn(1, 16)
    activation_bytes = x.numel() * x.element_size()

    def forwards(run):
        run()  # first calls fill kernel caches
        gc.collect()
        before = malloc_bytes_in_use()
        for _ in range(4):
            out = run()
            del out
            gc.collect()
        return malloc_bytes_in_use() - before

    def in_recipes():
        with rematerialized_saves():
            return F.relu(block(x, emb))

    assert forwards(in_recipes) < 0.25 * activation_bytes  # was 4 activations: one per forward
    assert forwards(lambda: F.relu(block(x, emb))) < 0.25 * activation_bytes  # plain autograd, for reference


@pytest.mark.parametrize("switches", [{}, {"levels": (1, 2), "mid": True, "conditions": True}, {"selective": False}],
                         ids=["selective", "checkpointed", "plain"])
def test_no_training_mode_of_the_unet_keeps_anything_of_a_dropped_forward(switches):
    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    from cpcbm_blocks import UNet3D, UNetSpec
    from cpcbm_blocks.memory import _conditions

    spec = UNetSpec.conditioned(text_channels=16, sample_size=(8, 32, 32), channels=(16, 32), num_groups=8,
                                head_channels=8)
    shape = (1, 1, 8, 32, 32)
    conditions = {k: torch.randn(v.shape) for k, v in _conditions(spec, shape, torch.float32, 7).items()}
    model, x, t = UNet3D(spec).set_gradient_checkpointing(**switches), torch.randn(shape), torch.tensor([3])
    model(x, t, **conditions)  # first calls fill kernel caches
    gc.collect()
    before = malloc_bytes_in_use()
    for _ in range(4):
        out = model(x, t, **conditions)
        del out
        gc.collect()
    # the selective mode kept 7.5 MiB per forward of the default spec at this size before the fix
    assert malloc_bytes_in_use() - before < 2**20


def test_held_tensors_keep_double_backward_as_plain_autograd_has_it():
    # Held tensors are packed detached; autograd gives the unpacked data its grad_fn back, so a
    # gradient of a gradient through them (GroupNorm saves its input and statistics, ReLU its
    # result) is the one plain autograd computes.
    norm = randomize_(torch.nn.GroupNorm(2, 4), seed=2)
    x0 = torch.randn(2, 4, 3, 5, 5)

    def grad_of_grad(recipes: bool):
        x = x0.clone().requires_grad_()
        with rematerialized_saves() if recipes else contextlib.nullcontext():
            y = torch.relu(norm(x * 1.5)).sin()
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [x, *norm.parameters()])

    for held, plain in zip(grad_of_grad(True), grad_of_grad(False), strict=True):
        torch.testing.assert_close(held, plain)
        assert plain.abs().sum() > 0


def test_a_held_tensor_modified_in_place_after_the_forward_is_refused_as_autograd_would():
    # Under a saved-tensor hook autograd skips its own version check; a silently wrong gradient
    # would follow. The recipes' hook checks, as autograd does without one.
    x = torch.randn(5, requires_grad=True)
    h = x * 2  # held by sin's backward (no recipe)
    with rematerialized_saves():
        y = h.sin()
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match=r"rematerialized_saves: a tensor of shape \(5,\) saved for backward "
                                           r"was modified in place after the forward"):
        y.sum().backward()


def test_saved_apart_holds_any_other_tensor_and_refuses_one_modified_in_place():
    a = torch.randn(5, requires_grad=True)
    b = torch.randn(5)
    with rematerialized_saves():
        out = _Scale.apply(a * 1.0, b)
    b.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        out.sum().backward()


def test_saves_apart_only_where_the_recipes_hook_is_the_innermost():
    assert not saves_apart() and not remaking_products()
    with rematerialized_saves(products=True):
        assert saves_apart() and remaking_products()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # a checkpoint region, say
            assert not saves_apart()
    with rematerialized_saves():
        assert saves_apart() and not remaking_products()


def test_what_a_product_was_remade_from_goes_once_the_product_is_made():
    """A cheap recipe that feeds a product and something else (the stem's output: level 1's first block
    remakes from it, and that block's norm saves it) is shared while one saved tensor is remade. Once
    the product is made (and kept), it goes: it is not held until the whole saved tensor is, while the
    rest of that remake runs (a fusion's FiLM maps and modulated product, at the level-1 peak)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, generator=generator).requires_grad_()
    w = torch.randn(2, 3, generator=generator).requires_grad_()
    stems, gone_when_used = [], []

    def stem(t):
        out = t * 2.0
        stems.append(weakref.ref(out))
        return out

    def later(p, other):  # runs after the product, in the same remake
        gone_when_used.append([ref() is None for ref in stems])
        return p * other

    def fn():
        s = recomputable(stem, x)
        neighbour = recomputable(torch.neg, s)  # a second consumer: the stem is shared while remade
        p = recomputable_product(torch.sin, s)
        return torch.cos(recomputable(later, p, w)) + neighbour.sum()  # cos saves later's result

    plain_out, plain = _grads(fn, x, w)
    for leaf in (x, w):
        leaf.grad = None
    stems.clear()
    gone_when_used.clear()
    with rematerialized_saves(products=True):
        out = fn()
    out.square().sum().backward()
    # The forward's call, then the remake for cos's backward: the stem remade for the product had gone
    # by the time `later` ran.
    assert gone_when_used == [[False], [True, True]]
    torch.testing.assert_close(out.detach(), plain_out)
    for leaf, expected in zip((x, w), plain, strict=True):
        torch.testing.assert_close(leaf.grad, expected)
