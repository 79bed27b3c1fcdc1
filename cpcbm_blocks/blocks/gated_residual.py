"""`gated_residual(x, gate, u)`: `x + tanh(g) ⊙ u`, the tanh-gated residual through which a fusion block adds its condition.

The gate is one number per channel, broadcast over the batch and the volume. PyTorch's own backward of
`x + scale[None, :, None, None, None] * u` makes the full-size product `grad * u` and then sums it
over everything but the channels: at full resolution one more 64 MiB tensor, at the moment the
block's backward peaks. Here the per-channel sums are matrix products (one dot product per channel
and sample), so the only full-size tensor the backward makes is `u`'s gradient. The function and its
gradients are those of the plain expression (tested); `u` is saved through autograd's saved-tensor
hooks, so inside [`rematerialized_saves`][cpcbm_blocks.rematerialize.rematerialized_saves] it is
saved as its recipe.

Under `torch.compile`, fx tracing, or when the dtypes differ (autocast), the plain expression runs:
the partitioner makes its own choices, and PyTorch's type promotion stays exactly as it was.
"""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["gated_residual", "per_channel_dot"]


def gated_residual(x: Float[Tensor, "b c d h w"], gate: Float[Tensor, " c"], u: Float[Tensor, "b c d h w"]
                   ) -> Float[Tensor, "b c d h w"]:
    """`x + tanh(gate)[None, :, None, None, None] * u`, with a backward that makes no full-size product for the gate."""
    scale = torch.tanh(gate)
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or not x.dtype == u.dtype == scale.dtype):
        return x + _per_channel(scale) * u
    return _GatedResidual.apply(x, scale, u)


def _per_channel(scale: Tensor) -> Tensor:
    return scale[None, :, None, None, None]  # no size read: fx tracing (block diagrams) sees symbolic ones


def per_channel_dot(a: Float[Tensor, "b c *spatial"], b: Float[Tensor, "b c *spatial"]) -> Float[Tensor, " c"]:
    """`(a * b).sum(every dimension but 1)` as one batched matrix product per sample: no full-size product."""
    channels = a.shape[1]
    total = None
    for sample_a, sample_b in zip(a, b):  # (c, ...) each; a view for contiguous samples, one sample's copy otherwise
        dots = torch.bmm(sample_a.reshape(channels, 1, -1), sample_b.reshape(channels, -1, 1)).view(channels)
        total = dots if total is None else total + dots
    return total if total is not None else a.new_zeros(channels)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, u: Tensor) -> Tensor:
        ctx.save_for_backward(scale, u if ctx.needs_input_grad[1] else None)  # u only for the gate's gradient
        return torch.addcmul(x, _per_channel(scale), u)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        scale, u = ctx.saved_tensors
        grad_scale = per_channel_dot(grad, u) if ctx.needs_input_grad[1] else None
        del u  # a remade u goes before u's gradient is made
        grad_u = grad * _per_channel(scale) if ctx.needs_input_grad[2] else None
        return grad if ctx.needs_input_grad[0] else None, grad_scale, grad_u
