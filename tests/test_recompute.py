"""Selective recomputation: the same gradients, fewer activations held, and no expensive convolution twice."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cpcbm_blocks import TimestepInjection, UNet3D, UNetSpec
from cpcbm_blocks.blocks import resblock as resblock_module
from cpcbm_blocks.memory import memory_plan
from cpcbm_blocks.recompute import CHEAP_PER_OUTPUT

from .conftest import randomize_


def _conditioned_spec() -> UNetSpec:
    return UNetSpec.conditioned(text_channels=8, channels=(8, 16), attention_levels=(2,), num_groups=4, head_channels=4,
                                sample_size=(4, 8, 8), time_embedding_channels=16)


def _step(model, x, t, conditions):
    model.zero_grad(set_to_none=True)
    out = model(x, t, **conditions)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _inputs(spec):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 8, 8, generator=generator)
    conditions = {}
    if spec.conditioning is not None:
        conditions = {"text": torch.randn(2, 5, 8, generator=generator),
                      "cond_images": torch.randn(2, spec.conditioning.image_channels, 4, 8, 8, generator=generator)}
    return x, torch.tensor([3.0, 700.0]), conditions


def _variants(tiny_spec):
    conditioned = _conditioned_spec()
    return {
        "tiny": tiny_spec,
        "conditioned": conditioned,
        "conditioned, scale-shift": dataclasses.replace(conditioned, timestep_injection=TimestepInjection.SCALE_SHIFT),
        # a recipe must be deterministic: dropout's output is saved as a tensor, so seeded runs agree
        "conditioned, dropout": dataclasses.replace(conditioned, dropout=0.3),
    }


@pytest.mark.parametrize("variant", ["tiny", "conditioned", "conditioned, scale-shift", "conditioned, dropout"])
def test_selective_recomputation_gives_the_plain_gradients(tiny_spec, variant):
    # Residual blocks, samplers and dynamic-conv fusion through recipes, the other steps through a
    # selective checkpoint: the model's function and gradients are plain PyTorch's.
    spec = _variants(tiny_spec)[variant]
    model = randomize_(UNet3D(spec), scale=0.1, seed=0)
    x, t, conditions = _inputs(spec)
    torch.manual_seed(5)
    out, selective = _step(model, x, t, conditions)
    torch.manual_seed(5)
    out_plain, plain = _step(model.set_gradient_checkpointing(selective=False), x, t, conditions)
    torch.testing.assert_close(out, out_plain)
    assert selective.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(selective[name], plain[name], msg=name)


class _CountConvolutions(TorchDispatchMode):
    """Counts forward convolutions by cost (not the transposed ones, which are `Conv3d`'s input gradients where its
    input was saved apart): `expensive` ones do at least CHEAP_PER_OUTPUT multiply-adds per output;
    `onednn_as_is` counts the calls of oneDNN's operator itself (conv.py's form for small batch-1 volumes)."""

    def __init__(self):
        super().__init__()
        self.expensive = self.cheap = self.onednn_as_is = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.onednn_as_is += func is torch.ops.aten.mkldnn_convolution.default
        transposed = func is torch.ops.aten.convolution.default and args[6]  # an input gradient, not a forward
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.mkldnn_convolution.default) and not transposed:
            weight = args[1]
            if weight.shape[1] * weight.shape[2:].numel() >= CHEAP_PER_OUTPUT:
                self.expensive += 1
            else:
                self.cheap += 1
        return func(*args, **(kwargs or {}))


def test_selective_recomputation_runs_no_expensive_convolution_twice():
    spec = _conditioned_spec()  # 8 channels at level 1 (3x3x3: 216 multiply-adds per output), 16 at level 2 (432)
    model = randomize_(UNet3D(spec), scale=0.1, seed=0)
    x, t, conditions = _inputs(spec)
    with torch.no_grad(), _CountConvolutions() as forward_only:
        model(x, t, **conditions)
    with _CountConvolutions() as step:
        model(x, t, **conditions).sum().backward()
    assert forward_only.expensive > 0 and step.expensive == forward_only.expensive  # backward recomputed none
    assert step.cheap > forward_only.cheap  # cheap ones are run again rather than held


def _one_sample_of_8_slices(*, size: int):
    """A conditioned UNet and one sample of (8, size, size): at batch 1 `Conv3d` calls oneDNN's operator
    itself (conv.py), and with 8 slices level 2 is 4 deep, so its 16-channel convolutions (432
    multiply-adds per output) are not folded."""
    spec = UNetSpec.conditioned(text_channels=8, channels=(8, 16), attention_levels=(2,), num_groups=4, head_channels=4,
                                sample_size=(8, size, size), time_embedding_channels=16)
    model = randomize_(UNet3D(spec), scale=0.1, seed=0)
    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 1, 8, size, size, generator=generator), torch.tensor([3.0])
    conditions = {"text": torch.randn(1, 5, 8, generator=generator),
                  "cond_images": torch.randn(1, spec.conditioning.image_channels, 8, size, size, generator=generator)}
    return model, x, t, conditions


def test_selective_recomputation_runs_no_expensive_convolution_twice_at_batch_1():
    """At batch 1 the small volumes run `aten.mkldnn_convolution` (conv.py), in forward and for input gradients:
    a selective step runs exactly the expensive convolutions a plain step runs."""
    model, x, t, conditions = _one_sample_of_8_slices(size=8)
    counts = {}
    for selective in (True, False):
        model.set_gradient_checkpointing(selective=selective)
        with _CountConvolutions() as step:
            model(x, t, **conditions).sum().backward()
        counts[selective] = step
    assert counts[False].expensive > 0 and counts[True].expensive == counts[False].expensive
    assert counts[True].cheap > counts[False].cheap


@pytest.mark.parametrize("switches", [{}, {"levels": (1, 2), "mid": True, "conditions": True}],
                         ids=["selective", "checkpointed"])
def test_at_batch_1_recomputation_gives_the_plain_gradients_with_onednn_as_is(switches):
    """Batch 1 is where `Conv3d` calls oneDNN's operator itself (conv.py): recipes, selective checkpoints and
    full checkpointing recompute through it and still give plain PyTorch's output and gradients."""
    model, x, t, conditions = _one_sample_of_8_slices(size=16)
    out_plain, plain = _step(model.set_gradient_checkpointing(selective=False), x, t, conditions)
    with _CountConvolutions() as counter:
        out, recomputed = _step(model.set_gradient_checkpointing(**switches), x, t, conditions)
    assert counter.onednn_as_is > 0
    torch.testing.assert_close(out, out_plain)
    assert recomputed.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def test_selective_recomputation_holds_far_fewer_activations_for_the_same_flops():
    selective = memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64))
    plain = memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), selective=False)
    assert selective.saved_bytes < 0.5 * plain.saved_bytes
    assert selective.forward_flops == plain.forward_flops
    assert plain.backward_flops <= selective.backward_flops < 1.02 * plain.backward_flops


@pytest.mark.parametrize("checkpointed", [False, True])
def test_skips_taken_apart_give_the_concatenations_output_and_gradients(monkeypatch, checkpointed):
    # Tiny volumes fall below SKIP_APART_MIN_BYTES; move it to take every skip apart, or none.
    spec = _conditioned_spec()
    model = randomize_(UNet3D(spec), scale=0.1, seed=0)
    if checkpointed:
        model.set_gradient_checkpointing(levels=(1, 2), mid=True, conditions=True)
    x, t, conditions = _inputs(spec)
    calls = []
    original = resblock_module._conv_over_parts
    monkeypatch.setattr(resblock_module, "_conv_over_parts", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = {}
    for apart, threshold in ((True, 0), (False, float("inf"))):
        monkeypatch.setattr(resblock_module, "SKIP_APART_MIN_BYTES", threshold)
        calls.clear()
        results[apart] = _step(model, x, t, conditions)
        up_blocks_with_a_skip = sum(step.takes_skip for step in model.steps)
        # conv1 and the skip projection; checkpointed, conv1 is remade once in backward
        assert len(calls) == ((2 + checkpointed) * up_blocks_with_a_skip if apart else 0)
    torch.testing.assert_close(results[True][0], results[False][0])
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, msg=name)
