"""Selective recomputation: the same gradients, fewer activations held, and no 3x3x3 convolution twice."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cpcbm_blocks import UNet3D, UNetSpec
from cpcbm_blocks.memory import memory_plan

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


def test_selective_recomputation_gives_the_plain_gradients(tiny_spec):
    for spec in (tiny_spec, _conditioned_spec()):
        model = randomize_(UNet3D(spec), scale=0.1, seed=0)
        x, t, conditions = _inputs(spec)
        out, selective = _step(model, x, t, conditions)
        out_plain, plain = _step(model.set_gradient_checkpointing(selective=False), x, t, conditions)
        torch.testing.assert_close(out, out_plain)
        assert selective.keys() == plain.keys() and plain
        for name in plain:
            torch.testing.assert_close(selective[name], plain[name], msg=name)


class _CountConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.full = self.pointwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            if args[1].shape[2:].numel() > 1:
                self.full += 1
            else:
                self.pointwise += 1
        return func(*args, **(kwargs or {}))


def test_selective_recomputation_runs_no_spatial_convolution_twice():
    spec = _conditioned_spec()
    model = randomize_(UNet3D(spec), scale=0.1, seed=0)
    x, t, conditions = _inputs(spec)
    with torch.no_grad(), _CountConvolutions() as forward_only:
        model(x, t, **conditions)
    with _CountConvolutions() as step:
        model(x, t, **conditions).sum().backward()
    assert forward_only.full > 0 and step.full == forward_only.full  # backward recomputed none of them
    assert step.pointwise > forward_only.pointwise  # 1x1x1 projections are cheap enough to run again


def test_selective_recomputation_holds_far_fewer_activations_for_the_same_flops():
    selective = memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64))
    plain = memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), selective=False)
    assert selective.saved_bytes < 0.5 * plain.saved_bytes
    assert selective.forward_flops == plain.forward_flops
    assert plain.backward_flops <= selective.backward_flops < 1.02 * plain.backward_flops
