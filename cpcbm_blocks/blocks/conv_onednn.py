"""Which kernels PyTorch's CPU backend runs a convolution with, and what the `meta` device stands for.

PyTorch hands a float32 convolution to oneDNN only when `N*C*size(2)*size(3)` (`N*C*D*H` in 3-D,
`N*C*H*W` in 2-D) exceeds `SLOW_CONV_LIMIT`, or the batch, the groups or the kernel is large
(`use_mkldnn` in ATen's `Convolution.cpp`); below that it runs its own `slow_conv` kernels,
several times slower. `runs_on_onednn`
mirrors that choice: [`Conv3d`][cpcbm_blocks.Conv3d] routes around it (oneDNN's operator called
directly, or depth moved last), and the memory planner models each backend's temporaries by it.

The planner runs the real modules on the `meta` device, which has neither backend.
`meta_stands_for("cpu" | "cuda")` says which device's forms a convolution on `meta` takes, and
this module teaches torch what it lacks for oneDNN's operator there: a `meta` kernel (the output's
shape and layout) and a FLOP formula for `FlopCounterMode`.
"""

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from cpcbm_blocks.errors import InputError

__all__ = ["META_DEVICES", "SLOW_CONV_LIMIT", "meta_stands_for", "pointwise", "runs_on_onednn"]


SLOW_CONV_LIMIT = 20480
"""PyTorch (2.x, CPU, float32, batch 1, groups 1) runs a convolution with its own `slow_conv` kernels,
not oneDNN, when `N*C*size(2)*size(3)` (`N*C*D*H` in 3-D) is at most this (`use_mkldnn` in
aten/src/ATen/native/Convolution.cpp). The memory planner uses it too."""

def pointwise(weight: Tensor, stride: tuple[int, ...], groups: int = 1) -> bool:
    """True for an ungrouped, unstrided convolution whose kernel is a single tap (2-D or 3-D)."""
    return all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in stride) and groups == 1


META_DEVICES = ("cpu", "cuda")
"""What the `meta` device can stand for (`meta_stands_for`), and so what a memory plan can be made for."""

_meta_stands_for = "cpu"


@contextlib.contextmanager
def meta_stands_for(device: str) -> Iterator[None]:
    """Within, convolutions on the `meta` device take the forms a run on `device` (`"cpu"`, the default
    outside, or `"cuda"`) would take: how the memory planner plans a GPU step with the GPU's forms."""
    global _meta_stands_for
    if device not in META_DEVICES:
        raise InputError(f"device: expected one of {list(META_DEVICES)}, got {device!r}. "
                         "Pass the device the plan is for.")
    before, _meta_stands_for = _meta_stands_for, device
    try:
        yield
    finally:
        _meta_stands_for = before


def cpu_kernels(x: Tensor) -> bool:
    """Take the CPU paths: on CPU, and on `meta` while it stands for a CPU step (the memory planner)."""
    return x.device.type == "cpu" or (x.device.type == "meta" and _meta_stands_for == "cpu")


def runs_on_onednn(x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> bool:
    """Whether PyTorch's CPU backend hands this float32 convolution to oneDNN rather than its own
    `slow_conv` kernels (`use_mkldnn` in ATen's `Convolution.cpp`, for the undilated convolutions here).
    The memory planner models each backend's temporaries by it."""
    if pointwise(weight, stride) and x.shape[0] < 16 and torch.get_num_threads() == 1:
        return False  # a matrix product of PyTorch's own
    return sizes_reach_onednn(x, weight, groups)


def sizes_reach_onednn(x: Tensor, weight: Tensor, groups: int) -> bool:
    """The part of `runs_on_onednn` that reads sizes (and no thread count, which `torch.compile` cannot trace)."""
    return (x.shape[0] > 1 or groups > 1 or math.prod(x.shape[:4]) > SLOW_CONV_LIMIT
            or (weight.shape[-1] > 3 and weight.shape[-2] > 3))


def onednn_runs_it_as_is(x: Tensor, weight: Tensor, stride: tuple[int, ...], groups: int) -> bool:
    """Where `_OneDnnConv3d` applies and pays: a float32 convolution PyTorch would leave to its own kernels,
    ungrouped, stride 1 (so the input gradient is a convolution too). Pointwise kernels included: on one
    thread or two, oneDNN's ran 1.3-3x faster than PyTorch's own at `(1, 32, 4, 64, 64)` to 64 channels
    and the like. Even kernels included: the sub-pixel upsample's 2-tap parity kernels, which would
    otherwise move depth last and copy an output of 8 parities' channels both ways."""
    return (x.dtype == torch.float32 and groups == 1 and all(s == 1 for s in stride)
            and not runs_on_onednn(x, weight, stride, groups))


mkldnn_convolution = torch.ops.aten.mkldnn_convolution


def _mkldnn_convolution_meta(x, weight, bias, padding, stride, dilation, groups):
    """Output of `aten.mkldnn_convolution` on `meta`, where PyTorch has no kernel for it: the memory planner
    runs the forms a CPU step runs. oneDNN writes channels-last when the input or the weight is."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, p, s, d in zip(x.shape[2:], weight.shape[2:], padding, stride, dilation)]
    out = x.new_empty((x.shape[0], weight.shape[0], *spatial))
    channels_last = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if any(t.is_contiguous(memory_format=channels_last) and not t.is_contiguous() for t in (x, weight)):
        return out.contiguous(memory_format=channels_last)
    return out


def _mkldnn_convolution_flops(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *, out_shape) -> int:
    """`FlopCounterMode`'s formula for `aten.mkldnn_convolution`, which torch's registry lacks: a convolution's."""
    return conv_flop_count(x_shape, w_shape, out_shape)


# Taught to torch once per process, and only what it lacks: FlopCounterMode (and so the memory planner and
# the benchmarks) counts this operator's FLOPs, and the meta device runs it.
if mkldnn_convolution not in flop_registry:
    register_flop_formula(mkldnn_convolution)(_mkldnn_convolution_flops)
if not torch._C._dispatch_has_kernel_for_dispatch_key(mkldnn_convolution.default.name(), "Meta"):
    _ATEN_META = torch.library.Library("aten", "IMPL")  # kept alive: the registration lasts as long as the library
    _ATEN_META.impl("mkldnn_convolution", _mkldnn_convolution_meta, "Meta")


def depth_last_reaches_onednn(x: Tensor, weight: Tensor, groups: int) -> bool:
    """True when the sizes keep this convolution from oneDNN and would not with depth moved last (PyTorch's
    check reads `N*C*D*H`, which becomes `N*C*H*W`). A batch of two or more already runs on oneDNN. The
    thread count, which `runs_on_onednn` also reads for pointwise kernels, is the same either way."""
    return not sizes_reach_onednn(x, weight, groups) and sizes_reach_onednn(x.movedim(2, -1), weight.movedim(2, -1),
                                                                              groups)
