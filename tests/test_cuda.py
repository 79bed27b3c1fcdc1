"""The UNet on a CUDA device computes what it computes on the CPU (skipped without one).

The library is developed on CPU machines; these tests are what a GPU run (`benchmarks/gpu_session.sh`)
checks first: the default and the conditioned UNet, forward and backward, give the CPU's outputs
and gradients on CUDA (fp32 with TF32 off, so only the order of summation differs); every
gradient-checkpointing switch, and selective recomputation (off by default on a GPU), gives the
default model's gradients there; a bf16-autocast step stays finite.
"""

import copy

import pytest
import torch

from cpcbm_blocks import UNet3D

from .conftest import randomize_
from .test_conditioning import inputs, small_conditioned

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would round the products to 10 bits of mantissa: keep fp32 exact up to summation order."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _case(spec=None):
    """A small randomised model (`spec`, else the conditioned one) and its inputs, on the CPU."""
    if spec is None:
        model = randomize_(UNet3D(small_conditioned()), scale=0.05)
        x, conditions = torch.randn(2, 1, 4, 16, 16), inputs()
    else:
        model = randomize_(UNet3D(spec), scale=0.05)
        x, conditions = torch.randn(2, 1, 4, 8, 8), {}
    return model, x, torch.tensor([3.0, 700.0]), conditions


def _step(model, x, t, conditions, device):
    """Output and parameter gradients of one forward and backward on `device`."""
    model = model.to(device)
    moved = {name: value.to(device) for name, value in conditions.items()}
    model.zero_grad(set_to_none=True)
    out = model(x.to(device), t.to(device), **moved)
    out.square().mean().backward()
    return out.detach().cpu(), {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


@pytest.mark.parametrize("conditioned", [False, True], ids=["tiny", "conditioned"])
def test_the_unet_on_cuda_gives_the_cpu_outputs_and_gradients(conditioned, tiny_spec):
    model, x, t, conditions = _case(None if conditioned else tiny_spec)
    out_cpu, grads_cpu = _step(copy.deepcopy(model), x, t, conditions, "cpu")
    out_cuda, grads_cuda = _step(model, x, t, conditions, DEVICE)
    torch.testing.assert_close(out_cuda, out_cpu, rtol=1e-4, atol=1e-5)
    assert grads_cuda.keys() == grads_cpu.keys()
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_cuda[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("switches", [{"selective": True}, {"selective": False},
                                      {"levels": (1, 2, 3, 4), "mid": True, "conditions": True}],
                         ids=["selective=True", "selective=False", "everything checkpointed"])
def test_checkpointing_on_cuda_gives_the_default_gradients(switches):
    model, x, t, conditions = _case()
    _, expected = _step(model, x, t, conditions, DEVICE)
    model.set_gradient_checkpointing(**switches)
    _, grads = _step(model, x, t, conditions, DEVICE)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_bf16_autocast_step_on_cuda_stays_finite():
    model, x, t, conditions = _case()
    model = model.to(DEVICE)
    moved = {name: value.to(DEVICE) for name, value in conditions.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(x.to(DEVICE), t.to(DEVICE), **moved)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
