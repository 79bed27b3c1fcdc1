"""diffusers' schedulers drive our UNet unchanged: the timesteps they pass are what `UNet3D.forward` takes.

diffusers is an optional test dependency (`pip install "cpcbm-blocks[interop]"`; scripts/install.sh
installs it for CI).
"""

import pytest
import torch

from cpcbm_blocks import UNet3D

from .conftest import randomize_

diffusers = pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "cpcbm-blocks[interop]"')


def test_a_ddpm_training_step_with_add_noise_and_integer_timesteps(tiny_spec):
    torch.manual_seed(0)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    model = randomize_(UNet3D(tiny_spec), scale=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x0 = torch.randn(2, 1, 4, 8, 8)
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
    assert timesteps.dtype == torch.int64
    noisy = scheduler.add_noise(x0, noise, timesteps)

    prediction = model(noisy, timesteps)
    loss = torch.nn.functional.mse_loss(prediction, noise)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():  # integer timesteps are the same times as their float values
        assert torch.equal(model(noisy, timesteps), model(noisy, timesteps.float()))


def test_a_ddim_sampling_loop_with_the_schedulers_0d_tensor_timesteps(tiny_spec):
    torch.manual_seed(0)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    model = randomize_(UNet3D(tiny_spec), scale=0.05).eval()
    x = torch.randn(2, 1, 4, 8, 8)
    seen = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            assert isinstance(t, torch.Tensor) and t.ndim == 0
            eps = model(x, t)
            # The same time given as a Python int (what a hand-written loop passes) or one per sample.
            assert torch.equal(eps, model(x, int(t)))
            assert torch.equal(eps, model(x, t.expand(x.shape[0])))
            seen.append(int(t))
            x = scheduler.step(eps, t, x).prev_sample
    assert seen == [750, 500, 250, 0]
    assert x.shape == (2, 1, 4, 8, 8) and torch.isfinite(x).all()


def test_a_fresh_unet_predicts_zero_noise_so_ddim_reduces_to_its_closed_form(tiny_spec):
    # With eps = 0 and eta = 0, each DDIM step is x <- sqrt(alpha_prev / alpha_t) x: a check that the
    # loop really used our prediction (a wrong shape or dtype would not reduce to this).
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(3)
    model = UNet3D(tiny_spec).eval()
    x = torch.randn(1, 1, 4, 8, 8)
    start = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x).prev_sample
    first, last = scheduler.alphas_cumprod[int(scheduler.timesteps[0])], scheduler.final_alpha_cumprod
    expected = start * (last / first).sqrt()
    torch.testing.assert_close(x, expected)
