"""`MultiHeadSelfAttention3D` over the `d*h*w` voxels, and the one attention function it uses."""

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from cpcbm_blocks.arguments import check_bool, check_counts
from cpcbm_blocks.blocks.conv import zero_init
from cpcbm_blocks.blocks.group_norm import check_group_norm_input
from cpcbm_blocks.contracts import shape_checked
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.spec import check_channel_multiple

__all__ = ["AttentionBackend", "MultiHeadSelfAttention3D", "attention", "attention_backend", "reference_attention",
           "set_attention_backend"]


class AttentionBackend(str, Enum):
    """How [`attention`][cpcbm_blocks.blocks.attention.attention] computes `softmax(q k^T / sqrt(e)) v`."""

    SDPA = "sdpa"
    """`F.scaled_dot_product_attention`: PyTorch's fused kernels, which never hold the `n x m` scores
    (flash attention on CPU, flash or memory-efficient on CUDA). The default."""
    NAIVE = "naive"
    """`reference_attention`: two einsums and a
    softmax, which materialise (and save for backward) the `b x heads x n x m` score tensor."""


class _Backend(threading.local):
    value: AttentionBackend = AttentionBackend.SDPA


_backend = _Backend()


def set_attention_backend(backend: AttentionBackend | str) -> None:
    """Choose the attention backend for the calling thread (`"sdpa"`, the default, or `"naive"`)."""
    try:
        _backend.value = AttentionBackend(backend)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in AttentionBackend)
        raise InputError(f"backend: expected one of {choices}, got {backend!r}. Pick one of the listed values.") from None


@contextmanager
def attention_backend(backend: AttentionBackend | str) -> Iterator[None]:
    """Context manager form of `set_attention_backend`."""
    before = _backend.value
    set_attention_backend(backend)
    try:
        yield
    finally:
        _backend.value = before


@shape_checked
def attention(q: Float[Tensor, "b heads n e"], k: Float[Tensor, "b heads m e"], v: Float[Tensor, "b heads m e"],
              key_mask: Bool[Tensor, "b m"] | None = None, *, upcast: bool = False) -> Float[Tensor, "b heads n e"]:
    """Scaled dot-product attention, `softmax(q k^T / sqrt(e)) v`, through `F.scaled_dot_product_attention`.

    This is the library's single attention kernel: self- and cross-attention both call it, so
    PyTorch's fused CPU/GPU kernels (flash, memory-efficient) serve every block. The backend is chosen
    with `attention_backend` (default: SDPA).

    **Arguments:**

    - `q`, `k`, `v`: queries, keys and values, per head.
    - `key_mask`: the keys each sample may attend to (True = keep). A sample whose keys are all
      masked gets a zero output (and zero gradients), never NaN: its row is computed unmasked and then
      multiplied by 0, because a softmax over no key is 0/0 and some backends return NaN for it
      (pytorch#103749, #103963).
    - `upcast`: compute in float32, with autocast off, and return in the inputs' dtype. In float16
      the scores `q k^T` overflow past 65504 in any backend that forms them in half precision, such as
      `"naive"` (on CPU and GPU; SDPA's fused kernels accumulate in float32); upcasting trades speed
      and memory for range.
    """
    keep_row = None
    keep = None
    if key_mask is not None:
        keep_row = key_mask.any(dim=-1)
        keep = key_mask | ~keep_row[:, None]  # an empty row attends everywhere, then is zeroed below
    if upcast and q.dtype != torch.float32:
        with _autocast_off(q.device.type):
            out = _kernel(q.float(), k.float(), v.float(), keep).to(q.dtype)
    else:
        out = _kernel(q, k, v, keep)
    return out if keep_row is None else out * keep_row[:, None, None, None].to(out.dtype)


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _kernel(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """The selected backend. On the `meta` device (used by the memory planner) SDPA's dispatcher has no
    fused kernel to pick and falls back to its math path, which materialises the scores; there the
    fused CPU kernel's own meta function is called instead, so that a plan on `meta` saves what a real
    run saves (the output and the log-sum-exp, no scores)."""
    if _backend.value is AttentionBackend.NAIVE:
        return reference_attention(q, k, v, keep)
    mask = None if keep is None else keep[:, None, None, :]
    if not torch.fx._symbolic_trace.is_fx_symbolic_tracing() and q.device.type == "meta":
        if mask is not None:  # as SDPA does before its fused kernels: a boolean mask becomes an additive one
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """The plain formula, materialising the score matrix: the `"naive"` backend, and the oracle of the tests."""
    scores = torch.einsum("bhne,bhme->bhnm", q, k) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhnm,bhme->bhne", scores.softmax(dim=-1), v)


class MultiHeadSelfAttention3D(nn.Module):
    """Multi-head self-attention over every voxel of a volume, as a zero-initialised residual.

    $$ y = x + W_o\\,\\mathrm{Attn}(W_q z, W_k z, W_v z),\\qquad z = \\mathrm{GN}(x)\\ \\text{as}\\ d h w\\ \\text{tokens} $$

    Heads are given as channels per head (the seed uses 8, i.e. 32 heads at 256 channels). There is
    no positional encoding, so the block is equivariant to any permutation of the voxels (tested).
    `W_o` starts at zero, so a fresh block is the identity.

    ??? cite "Vaswani et al. 2017; Ho et al. 2020 (self-attention in diffusion UNets)"

    **Arguments:**

    - `channels`: channels of the volume; a multiple of `head_channels` and of `num_groups`.
    - `head_channels`: channels per head.
    - `num_groups`: GroupNorm groups of the pre-norm.
    - `upcast`: compute the attention in float32 when the inputs are float16/bfloat16 (see
      [`attention`][cpcbm_blocks.blocks.attention.attention]).
    """

    def __init__(self, *, channels: int, head_channels: int = 8, num_groups: int = 32, upcast: bool = False) -> None:
        super().__init__()
        check_counts("MultiHeadSelfAttention3D", channels=channels, head_channels=head_channels, num_groups=num_groups)
        check_bool("MultiHeadSelfAttention3D(upcast=...)", upcast)
        check_channel_multiple("MultiHeadSelfAttention3D(channels=...)", channels, of=head_channels, of_name="head_channels")
        check_channel_multiple("MultiHeadSelfAttention3D(channels=...)", channels, of=num_groups, of_name="num_groups")
        self.channels = channels
        self.head_channels = head_channels
        self.upcast = upcast
        self.num_heads = channels // head_channels
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.channels} d h w"]) -> Float[Tensor, "b {self.channels} d h w"]:
        _, _, d, h, w = x.shape
        check_group_norm_input("MultiHeadSelfAttention3D.forward", self.norm, x)
        tokens = rearrange(self.norm(x), "b c d h w -> b (d h w) c")
        q, k, v = rearrange(self.qkv(tokens), "b n (three heads e) -> three b heads n e", three=3, heads=self.num_heads)
        out = rearrange(attention(q, k, v, upcast=self.upcast), "b heads n e -> b n (heads e)")
        return x + rearrange(self.proj_out(out), "b (d h w) c -> b c d h w", d=d, h=h, w=w)
