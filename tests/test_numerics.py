"""Numerics: bf16 autocast, fp16 attention upcast, fully masked key rows, determinism."""

import dataclasses

import pytest
import torch

from cpcbm_blocks import MultiHeadSelfAttention3D, UNet3D, UNetSpec, attention
from cpcbm_blocks.blocks.attention import attention_backend, reference_attention
from cpcbm_blocks.blocks.fusion_cross_attention import CrossAttentionFusion3D

from .conftest import randomize_
from .test_conditioning import inputs, small_conditioned


def _bf16_autocast_step(model: UNet3D, x: torch.Tensor, t: torch.Tensor, **conditions) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, **conditions)
        loss = out.float().square().mean()
    loss.backward()
    return out


def test_bf16_autocast_forward_and_backward_of_the_default_unet_are_finite():
    torch.manual_seed(0)
    model = randomize_(UNet3D(UNetSpec.default()), scale=0.05)
    out = _bf16_autocast_step(model, torch.randn(1, 1, 8, 16, 16), torch.tensor([500.0]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and out.abs().sum() > 0
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert bad == []


def test_bf16_autocast_forward_and_backward_of_a_conditioned_unet_are_finite():
    torch.manual_seed(0)
    model = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05)
    conditions = inputs(batch=2)
    conditions["text_mask"][1] = False  # one sample without text
    conditions["cond_available"][0, 1] = False  # and one missing image
    out = _bf16_autocast_step(model, torch.randn(2, 1, 4, 16, 16), torch.tensor([10, 900]), **conditions)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and out.abs().sum() > 0
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert bad == []


def test_a_fully_masked_text_row_never_gives_nan_in_the_conditioned_unet():
    torch.manual_seed(0)
    model = randomize_(UNet3D(small_conditioned()), scale=0.1)
    conditions = inputs(batch=2)
    conditions["text_mask"][0] = False
    out = model(torch.randn(2, 1, 4, 16, 16), torch.tensor([5, 500]), **conditions)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    encoded = model.encode_conditions(**conditions)
    for key, context in encoded.context.items():
        # the null text tokens stand in for the masked row, so each cross-attention row has a key
        assert encoded.context_mask[key].any(dim=1).all(), key
        assert torch.isfinite(context).all()


def test_upcast_attention_computes_in_float32_and_returns_the_inputs_dtype():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float16) * 4 for _ in range(3))
    out = attention(q, k, v, upcast=True)
    assert out.dtype == torch.float16
    assert torch.equal(out, attention(q.float(), k.float(), v.float()).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not pull the upcast back down
        out_autocast = attention(q, k, v, upcast=True)
    assert torch.equal(out_autocast, out)


def test_the_spec_switches_upcast_on_for_every_self_and_cross_attention_block():
    attention_blocks = (MultiHeadSelfAttention3D, CrossAttentionFusion3D)
    spec = small_conditioned()
    on = [m for m in UNet3D(dataclasses.replace(spec, upcast_attention=True)).modules() if isinstance(m, attention_blocks)]
    assert {type(m) for m in on} == set(attention_blocks) and all(m.upcast for m in on)
    assert not any(m.upcast for m in UNet3D(spec).modules() if isinstance(m, attention_blocks))


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fp16_scores_that_overflow_on_the_naive_backend_stay_finite_with_upcast(device):
    # The naive backend forms q k^T in float16. (On the GPU, SDPA's math backend did too in older
    # torch; torch 2.11's computes in float32 and stayed finite there, so it cannot show the overflow.)
    q = torch.full((1, 1, 4, 64), 40.0, dtype=torch.float16, device=device)  # q.k = 102400 > 65504
    v = torch.randn(1, 1, 4, 64, dtype=torch.float16, device=device)
    with attention_backend("naive"):
        assert not torch.isfinite(attention(q, q, v)).all()
        out = attention(q, q, v, upcast=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference_attention(q.float(), q.float(), v.float()), atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_fully_masked_key_row_gives_zero_output_and_finite_gradients_never_nan(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=dtype, requires_grad=True) for _ in range(3))
    key_mask = torch.tensor([[True, False, True], [False, False, False]])
    k3, v3 = k[:, :, :3], v[:, :, :3]
    out = attention(q, k3, v3, key_mask)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and not out[1].any()
    expected = reference_attention(q[:1].float(), k3[:1].float(), v3[:1].float(), key_mask[:1])
    torch.testing.assert_close(out[:1].float(), expected, atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=0)
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    assert not q.grad[1].any() and not k.grad[1].any() and not v.grad[1].any()


def test_deterministic_algorithms_and_a_seed_give_bitwise_identical_runs(tiny_spec):
    def run():
        torch.manual_seed(1234)
        model = randomize_(UNet3D(UNetSpec(**{**tiny_spec.__dict__, "dropout": 0.1})), scale=0.1, seed=7).train()
        x = torch.randn(2, 1, 4, 8, 8)
        out = model(x, torch.randint(0, 1000, (2,)))
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        (out_a, grads_a), (out_b, grads_b) = run(), run()
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
