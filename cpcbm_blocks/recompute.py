"""Selective recomputation: keep what was expensive to compute, recompute the rest in backward.

A residual block at the full 256x256 resolution holds six 64 MiB tensors for backward: the input of
each GroupNorm, of each SiLU and of each convolution. Only the convolutions were expensive to
compute; GroupNorm, SiLU, additions, concatenations and nearest-neighbour upsampling are
memory-bound and cost a few milliseconds to run again. `recompute_memory_bound(fn, ...)` runs `fn`
under `torch.utils.checkpoint` (non-reentrant) with a selective policy
(`create_selective_checkpoint_contexts`): the outputs of compute-bound operators (convolutions,
matrix products, fused attention) are kept, everything else is dropped after the forward and
recomputed from them when the gradient arrives. Only products with few multiply-adds per output
(`CHEAP_PER_OUTPUT`: 1x1x1 projections of up to 255 channels, against `27 C_in` for a 3x3x3
kernel) run twice.

[`UNet3D`][cpcbm_blocks.unet.UNet3D] runs its attention, fusion and condition-encoder steps this
way in eager training where `selective_by_default` says so (on the CPU; off on a GPU, where the
recomputation's per-operator dispatch costs more than it saves;
`set_gradient_checkpointing(selective=...)` overrides it). Its residual blocks and samplers go one step further with
[`rematerialized_saves`][cpcbm_blocks.rematerialize.rematerialized_saves], which does not keep the
convolution outputs that no backward needs either; under autocast they fall back to this. Full gradient
checkpointing of a level (`set_gradient_checkpointing(levels=...)`) goes further: it keeps only the
step's inputs and runs the convolutions again. Under `torch.compile` neither policy is applied by
this module: AOTAutograd's partitioner chooses what to save and recompute in a compiled graph.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cpcbm_blocks.blocks.conv_onednn import cpu_kernels

__all__ = ["CHEAP_PER_OUTPUT", "COMPUTE_BOUND", "recompute_memory_bound", "selective_by_default"]

_aten = torch.ops.aten

_ATTENTION = frozenset({
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
})

COMPUTE_BOUND = frozenset({
    _aten.convolution.default, _aten.mkldnn_convolution.default,  # the latter: `Conv3d` on small CPU volumes
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    *_ATTENTION,
})
"""The operators whose outputs are kept (unless `CHEAP_PER_OUTPUT` says otherwise): recomputing them
would cost real FLOPs."""


CHEAP_PER_OUTPUT = 256
"""A product whose every output costs fewer multiply-adds than this is recomputed, not kept: a 1x1x1
projection of up to 255 channels does as little arithmetic per byte it would hold as a norm does."""


def _multiply_adds_per_output(op, args) -> int:
    if op is _aten.convolution.default or op is _aten.mkldnn_convolution.default:
        weight = args[1]
        return weight.shape[1] * weight.shape[2:].numel()  # (c_in / groups) x kernel taps
    if op is _aten.addmm.default or op is _aten.baddbmm.default:
        return args[1].shape[-1]
    return args[0].shape[-1]  # mm, bmm: the reduced dimension


def _keep_compute_bound(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op not in COMPUTE_BOUND:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in _ATTENTION or _multiply_adds_per_output(op, args) >= CHEAP_PER_OUTPUT:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def recompute_memory_bound(fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)`, holding for backward only the outputs of compute-bound operators.

    Gradients equal those of a plain call (the recomputed operators are deterministic; the RNG
    state is restored for dropout). Its inputs are held too, as by any checkpointed call.
    """
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_compute_bound), **kwargs)


def selective_by_default(x: Tensor) -> bool:
    """Whether a step on `x`'s device recomputes memory-bound operators unless told otherwise
    (`UNet3D.set_gradient_checkpointing(selective=None)`, the default): on the CPU, and on `meta`
    while it stands for the CPU (`meta_stands_for`); not on a GPU.

    Why by device: the recomputation runs each memory-bound operator (norm, activation,
    concatenation) again in backward, through a Python dispatch mode or saved-tensor hooks. On the
    CPU the kernels take milliseconds and that overhead is lost in them, while the memory it saves
    is what a CPU step is short of. On a GPU the same kernels take microseconds and the step is
    bound by dispatching and launching them: at the full (1, 1, 8, 256, 256) an H200 took several
    times as long per step with it under bf16 autocast, for about half the memory (the `selective=True`
    rows of the performance page's GPU table, `benchmarks/bench_gpu_step.py`). There,
    checkpointing levels or `torch.compile` are the better trades.
    """
    return cpu_kernels(x)
