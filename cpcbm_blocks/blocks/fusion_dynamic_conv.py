"""`DynamicConvFusion3D`: condition-routed dynamic convolution with spatial FiLM, as a gated residual."""

import math

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from cpcbm_blocks.arguments import as_triple, check_counts, check_number
from cpcbm_blocks.blocks.conv import Conv3d, conv3d
from cpcbm_blocks.blocks.gated_residual import gated_residual
from cpcbm_blocks.blocks.group_norm import check_group_norm_input
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.rematerialize import SavedApart, recomputable, recomputable_product, saves_apart
from cpcbm_blocks.spec import check_channel_multiple

__all__ = ["DynamicConvFusion3D", "naive_dynamic_conv"]


def naive_dynamic_conv(x: Tensor, experts: Tensor, expert_bias: Tensor, weights: Tensor) -> Tensor:
    """The form the original code used: K full convolutions, summed with per-sample weights.

    `experts` is `(K, C_out, C_in, kd, kh, kw)`, `weights` is `(B, K)`. Kept as the reference that
    [`DynamicConvFusion3D`][cpcbm_blocks.blocks.fusion_dynamic_conv.DynamicConvFusion3D]'s single
    grouped convolution is tested and benchmarked against; it costs K times the FLOPs and memory.
    """
    out = 0
    for k in range(experts.shape[0]):
        out = out + weights[:, k, None, None, None, None] * conv3d(x, experts[k], expert_bias[k])
    return out


class DynamicConvFusion3D(nn.Module):
    """Fuse a condition map into the network with a per-sample mixture of expert kernels and FiLM.

    $$ \\alpha = \\mathrm{softmax}(R\\,\\bar c / \\tau),\\quad W_b = \\sum_k \\alpha_{bk} W_k,\\quad
       u = (W_b * \\mathrm{GN}(x) + b_b) \\odot (1 + \\gamma(c)) + \\beta(c),\\quad
       y = x + \\tanh(g) \\odot u $$

    The router `R` reads the globally pooled condition `c̄`; `γ, β` are 1x1x1 convolutions of the
    condition map (spatial FiLM). Aggregating the kernels first (CondConv) turns K convolutions into
    ONE grouped convolution over the batch (`groups = B`): the cost of a single convolution, not K
    (benchmarked in `benchmarks/dynamic_conv.py`). `g` is zero-initialised, so a fresh block is the
    identity.

    ??? cite "Yang et al. 2019 (CondConv); Chen et al. 2020 (Dynamic Convolution); Perez et al. 2018 (FiLM)"

    **Arguments:**

    - `channels`: channels of the network features and of the condition map.
    - `num_experts`: expert kernels K.
    - `kernel_size`: per-axis kernel of the experts (`(1, 3, 3)` runs as 2-D convolutions).
    - `temperature`: router softmax temperature `τ`.
    - `num_groups`: GroupNorm groups of the pre-norm.
    """

    def __init__(self, *, channels: int, num_experts: int = 4, kernel_size: tuple[int, int, int] = (3, 3, 3),
                 temperature: float = 1.0, num_groups: int = 32) -> None:
        super().__init__()
        check_counts("DynamicConvFusion3D", channels=channels, num_experts=num_experts, num_groups=num_groups)
        check_channel_multiple("DynamicConvFusion3D(channels=...)", channels, of=num_groups, of_name="num_groups")
        kernel_size = as_triple("DynamicConvFusion3D(kernel_size=...)", kernel_size, odd=True)
        self.channels = channels
        self.num_experts = num_experts
        # a zero temperature divides the routing logits by zero (NaN output), a negative one inverts the routing
        self.temperature = check_number("DynamicConvFusion3D(temperature=...)", temperature, above=0)
        self.norm = nn.GroupNorm(num_groups, channels)
        self.experts = nn.Parameter(torch.empty(num_experts, channels, channels, *kernel_size))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, channels))
        fan_in = channels * math.prod(kernel_size)
        nn.init.uniform_(self.experts, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # nn.Conv3d's scale
        self.router = nn.Linear(channels, num_experts)
        self.film = Conv3d(channels, 2 * channels, kernel_size=(1, 1, 1))
        self.gate = nn.Parameter(torch.zeros(channels))

    @shape_checked
    def routing(self, condition: Float[Tensor, "b {self.channels} d h w"]) -> Float[Tensor, "b {self.num_experts}"]:
        """The per-sample expert weights `α` (rows sum to 1)."""
        return torch.softmax(self.router(condition.mean(dim=(2, 3, 4))) / self.temperature, dim=-1)

    def dynamic_conv(self, x: Tensor, weights: Tensor) -> Tensor:
        """`Σ_k α_bk W_k * x_b` as one grouped convolution: the batch becomes the groups."""
        batch = x.shape[0]
        kernels = torch.einsum("bk,koi...->boi...", weights, self.experts.to(x.dtype))
        bias = weights @ self.expert_bias.to(x.dtype)
        y = conv3d(rearrange(x, "b c d h w -> 1 (b c) d h w"), rearrange(kernels, "b o i ... -> (b o) i ..."),
                   rearrange(bias, "b o -> (b o)"), groups=batch)
        return rearrange(y, "1 (b c) d h w -> b c d h w", b=batch)

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.channels} d h w"], condition: Float[Tensor, "b {self.channels} d h w"]
                ) -> Float[Tensor, "b {self.channels} d h w"]:
        # Inside `rematerialized_saves()` (how UNet3D trains) everything but the convolution's output u
        # is saved for backward as its recipe: the norm, the 1x1x1 FiLM maps (cheap per output) and
        # the modulated u are remade one at a time when backward needs them; with `products=True`
        # (a checkpointed level) u is a recipe too, run once in backward.
        check_group_norm_input("DynamicConvFusion3D.forward", self.norm, x)
        u = recomputable_product(self.dynamic_conv, recomputable(self.norm, x), self.routing(condition))
        # γ and β as two recipes (the halves of the FiLM convolution): the backward of the modulation
        # needs γ alone, so only γ is remade for it, and their gradients are never one 2C-channel tensor.
        gamma, beta = (recomputable(self._film_half, condition, half) for half in (0, 1))
        return gated_residual(x, self.gate, recomputable(_modulate, u, gamma, beta))

    def _film_half(self, condition: Tensor, half: int) -> Tensor:
        """γ (`half=0`) or β (`half=1`): the 1x1x1 FiLM convolution with its half of the output channels."""
        channels = slice(half * self.channels, (half + 1) * self.channels)
        return conv3d(condition, self.film.weight[channels], self.film.bias[channels])


def _modulate(u: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """`u (1 + γ) + β`, as `u γ + β + u`: no `1 + γ` tensor, in forward or when remade. Not `addcmul`, whose
    backward first scales each factor by its `value` (a full-size copy per factor, even for 1).

    While rematerializing, its backward remakes γ and then u one at a time (`_Modulate`); autograd's
    own would hold both, with both their gradients."""
    if saves_apart() and torch.is_grad_enabled() and (u.requires_grad or gamma.requires_grad or beta.requires_grad):
        return _Modulate.apply(u, gamma, beta)
    return torch.mul(u, gamma).add_(beta).add_(u)


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        # Each remade on its own in backward, and only where the other's gradient is wanted.
        ctx.gamma = SavedApart(gamma) if ctx.needs_input_grad[0] else None
        ctx.u = SavedApart(u) if ctx.needs_input_grad[1] else None
        return torch.mul(u, gamma).add_(beta).add_(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grad_u = grad_gamma = None
        if ctx.needs_input_grad[0]:  # grad (1 + γ), as grad γ + grad
            gamma = ctx.gamma.unpack()
            grad_u = torch.mul(grad, gamma).add_(grad)
            del gamma  # gone before u is remade
        if ctx.needs_input_grad[1]:
            grad_gamma = grad * ctx.u.unpack()
        return grad_u, grad_gamma, grad if ctx.needs_input_grad[2] else None
