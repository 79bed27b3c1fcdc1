"""`TimestepEmbedding`: sinusoidal features of the diffusion time, then a 2-layer MLP."""

import math

import torch
from jaxtyping import Float, Real
from torch import Tensor, nn

from cpcbm_blocks.arguments import check_counts, check_int
from cpcbm_blocks.contracts import checks_active, shape_checked
from cpcbm_blocks.errors import InputError

__all__ = ["TimestepEmbedding", "sinusoidal_embedding", "timesteps_to_batch"]


def timesteps_to_batch(t: int | float | Tensor, *, batch_size: int, device: torch.device) -> Float[Tensor, " b"]:
    """Turn what a scheduler passes (Python number, 0-d or `(B,)` tensor) into a float `(B,)` tensor.

    Integers become floats and floats are kept as they are: `t=0.5` stays 0.5 (some libraries
    truncate it to 0). A scalar is broadcast to the batch. Raises
    [`InputError`][cpcbm_blocks.errors.InputError] for anything else.
    """
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise InputError(f"t: expected a number, a 0-d tensor or a ({batch_size},) tensor of timesteps, "
                         f"got {type(t).__name__}. Pass e.g. t=500 or torch.full(({batch_size},), 500).")
    if not isinstance(t, Tensor):
        if not (math.isfinite(t) and t >= 0):  # checked here too, as a meta tensor made from it has no value
            raise InputError(f"t: expected finite, non-negative timesteps, got {t!r}. Check the scheduler's timestep range.")
        t = torch.tensor(float(t), device=device)
    if t.device.type == "meta" and device.type != "meta":
        raise InputError(f"t: expected timesteps with values (on {device} or the CPU), got a tensor on the meta device. "
                         "Pass the scheduler's real timesteps.")
    if t.dtype == torch.bool or t.is_complex():
        raise InputError(f"t: expected an integer or floating-point tensor, got {t.dtype}. Convert with t.float().")
    if t.ndim == 0:
        t = t.expand(batch_size)
    elif t.shape != (batch_size,):
        raise InputError(f"t: expected shape () or ({batch_size},) to match the batch of x, got {tuple(t.shape)}. "
                         "Pass one timestep per sample, or a single scalar for the whole batch.")
    if checks_active() and t.device.type != "meta" and not bool(torch.isfinite(t).all() & (t >= 0).all()):
        raise InputError(f"t: expected finite, non-negative timesteps, got {t.tolist()}. "
                         "Check the scheduler's timestep range.")
    return t.to(device=device, dtype=torch.float32)


def sinusoidal_embedding(t: Float[Tensor, " b"], channels: int, *, max_period: float = 10_000.0) -> Float[Tensor, "b e"]:
    """Transformer-style features `[cos(t w_i), sin(t w_i)]` with `w_i = max_period^(-i / half)`."""
    half = channels // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if channels % 2:
        features = torch.nn.functional.pad(features, (0, 1))
    return features


class TimestepEmbedding(nn.Module):
    """Diffusion-time embedding: sinusoidal features of width `channels`, then Linear-SiLU-Linear.

    $$ e(t) = W_2\\,\\mathrm{SiLU}(W_1\\,[\\cos(t\\omega_i), \\sin(t\\omega_i)]_i + b_1) + b_2,
       \\quad \\omega_i = 10000^{-i/(c/2)} $$

    ??? cite "Vaswani et al. 2017 (sinusoids); Ho et al. 2020, DDPM (use in diffusion)"

    **Arguments:**

    - `channels`: width of the sinusoidal features (the UNet uses its base channels).
    - `out_channels`: width of the embedding given to every residual block (the UNet uses four times
      its base channels).
    """

    def __init__(self, *, channels: int, out_channels: int) -> None:
        super().__init__()
        # one cos/sin pair at least: with fewer channels the features would not depend on t
        check_int("TimestepEmbedding(channels=...)", channels, minimum=2)
        check_counts("TimestepEmbedding", out_channels=out_channels)
        self.channels = channels
        self.out_channels = out_channels
        self.mlp = nn.Sequential(nn.Linear(channels, out_channels), nn.SiLU(), nn.Linear(out_channels, out_channels))

    @shape_checked
    def forward(self, t: int | float | Real[Tensor, ""] | Real[Tensor, " b"], *,
                batch_size: int | None = None) -> Float[Tensor, "b {self.out_channels}"]:
        """Embed timesteps `t`; a scalar `t` needs `batch_size` (or gives a batch of 1)."""
        if batch_size is None:
            batch_size = t.shape[0] if isinstance(t, Tensor) and t.ndim == 1 else 1
        elif not torch.compiler.is_compiling():  # export's batch is a SymInt
            check_int("TimestepEmbedding.forward: batch_size", batch_size, minimum=1, error=InputError,
                      fix="Pass the batch of x, x.shape[0], or leave it out for a (B,) tensor t.")
        weight = self.mlp[0].weight
        t = timesteps_to_batch(t, batch_size=batch_size, device=weight.device)
        return self.mlp(sinusoidal_embedding(t, self.channels).to(weight.dtype))
