"""`CrossAttentionFusion3D`: voxels attend to condition tokens, as a tanh-gated residual."""

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from cpcbm_blocks.arguments import check_bool, check_counts
from cpcbm_blocks.blocks.attention import attention
from cpcbm_blocks.blocks.group_norm import check_group_norm_input
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.spec import check_channel_multiple

__all__ = ["CrossAttentionFusion3D"]


class CrossAttentionFusion3D(nn.Module):
    """Multi-head cross-attention from the `d*h*w` voxels to `m` condition tokens.

    $$ y = x + \\tanh(g) \\odot W_o\\,\\mathrm{Attn}(W_q\\,\\mathrm{GN}(x),\\ W_k\\,\\mathrm{LN}(c),\\ W_v\\,\\mathrm{LN}(c)) $$

    The tokens `c` are text tokens and pooled conditional-image tokens; `context_mask` marks the
    real ones and is honoured by the attention. A sample with no real token at all gets no update
    (never NaN, never a bias from the output projection).
    The gate `g` (one per channel) starts at zero, so a fresh block is the identity; unlike MONAI's
    transformer block, self-attention can stay on at the same level.

    ??? cite "Rombach et al. 2022 (latent diffusion cross-attention); Alayrac et al. 2022 (tanh gate)"

    **Arguments:**

    - `channels`: channels of the volume; a multiple of `head_channels` and `num_groups`.
    - `context_channels`: width of the condition tokens.
    - `head_channels`: channels per head.
    - `num_groups`: GroupNorm groups of the pre-norm.
    - `upcast`: compute the attention in float32 when the inputs are float16/bfloat16 (see
      [`attention`][cpcbm_blocks.blocks.attention.attention]).
    """

    def __init__(self, *, channels: int, context_channels: int, head_channels: int = 8, num_groups: int = 32,
                 upcast: bool = False) -> None:
        super().__init__()
        check_counts("CrossAttentionFusion3D", channels=channels, context_channels=context_channels,
                     head_channels=head_channels, num_groups=num_groups)
        check_bool("CrossAttentionFusion3D(upcast=...)", upcast)
        check_channel_multiple("CrossAttentionFusion3D(channels=...)", channels, of=head_channels, of_name="head_channels")
        check_channel_multiple("CrossAttentionFusion3D(channels=...)", channels, of=num_groups, of_name="num_groups")
        self.channels = channels
        self.upcast = upcast
        self.context_channels = context_channels
        self.num_heads = channels // head_channels
        self.norm = nn.GroupNorm(num_groups, channels)
        self.context_norm = nn.LayerNorm(context_channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_channels, 2 * channels)
        self.proj_out = nn.Linear(channels, channels)
        self.gate = nn.Parameter(torch.zeros(channels))

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.channels} d h w"], context: Float[Tensor, "b m {self.context_channels}"],
                context_mask: Bool[Tensor, "b m"]) -> Float[Tensor, "b {self.channels} d h w"]:
        _, _, d, h, w = x.shape
        check_group_norm_input("CrossAttentionFusion3D.forward", self.norm, x)
        q = rearrange(self.to_q(rearrange(self.norm(x), "b c d h w -> b (d h w) c")),
                      "b n (heads e) -> b heads n e", heads=self.num_heads)
        k, v = rearrange(self.to_kv(self.context_norm(context)), "b m (two heads e) -> two b heads m e",
                         two=2, heads=self.num_heads)
        out = self.proj_out(rearrange(attention(q, k, v, context_mask, upcast=self.upcast), "b heads n e -> b n (heads e)"))
        out = rearrange(out, "b (d h w) c -> b c d h w", d=d, h=h, w=w)
        has_context = context_mask.any(dim=1).to(out.dtype)[:, None, None, None, None]
        return x + torch.tanh(self.gate)[None, :, None, None, None] * out * has_context
