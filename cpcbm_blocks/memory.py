"""`memory_plan`: parameters, FLOPs and training memory of a spec's UNet, measured before running it.

The plan is not a formula. `memory_plan` builds the real
[`UNet3D`][cpcbm_blocks.unet.UNet3D] on PyTorch's `meta` device (tensors with shapes and dtypes but no
data) and runs one training step on it: forward, a mean-squared-error loss, backward, and an Adam
update. A `TorchDispatchMode` sees every operator of that step:

* **FLOPs** are counted by `torch.utils.flop_counter`'s formulas (the ones `FlopCounterMode` uses:
  convolutions, matmuls, attention; element-wise ops count 0, as everywhere), per step and per pass.
  Backward includes the recomputation of checkpointed steps, because it really runs.
* **Memory** is the set of live tensor storages: each storage is added when an operator creates it
  and removed when PyTorch frees it (a weak reference to the storage), so views, in-place ops and
  freed temporaries are accounted exactly as the allocator would see them. Activations *saved for
  backward* are the storages created during the forward that are still alive when it returns (the
  autograd graph holds them), attributed to the step that created them.
* **Peak** is the largest live total over the whole step, plus the parameters, plus the Adam state
  (which exists from the second step on, so it is added to the part before the first update).
* **Adam's update** runs as `torch.optim.Adam` runs by default on the device planned for. On CUDA
  that is the multi-tensor (`foreach`) form, whose arithmetic makes a temporary as large as all the
  parameters together; on CPU torch updates one parameter at a time, so its temporaries are those
  of the largest parameter. Where the activations are small (the default at 64x64), the update is
  the step's peak on CUDA and not on CPU. (`Adam(..., foreach=True)` on CPU makes the CUDA form's
  temporaries, which this plan does not count.)

* **oneDNN's copies** (`device="cpu"`, the default). On CPU, PyTorch's convolutions run on oneDNN,
  which computes on *channel-blocked* copies of plain-layout (NCDHW) activations, channels padded
  to its block (16 on AVX-512), and writes the result back to the plain tensor. Those copies are
  transients the meta device never creates, as large as the activations themselves: at full size a
  level-1 weight gradient briefly holds 128 MiB beyond its inputs. `onednn_scratch_bytes` models
  them from measurements (`tests/test_memory.py` checks the model against malloc on real
  convolutions) and the plan adds each one on top of what is live when its convolution runs.

* **cuDNN's workspace** (`device="cuda"`). cuDNN's tensor-core convolutions compute in the
  channels-last layout (NDHWC), so on plain-layout tensors each call transposes its operands into a
  workspace that the caching allocator hands out for the call alone: at full size the level-1
  convolutions take 128 MiB of it in float32, as much as a 64 MiB input and its 64 MiB output
  together. `cudnn_workspace_bytes` models it from the allocator's own history of a real step on an
  H200 (`benchmarks/bench_gpu_step.py --snapshot`), and the plan adds it as it adds oneDNN's copies.
  A CUDA plan also runs each convolution in the form a GPU would
  (`cpcbm_blocks.blocks.conv_onednn.meta_stands_for`): none of the CPU-only forms (oneDNN called
  directly or depth moved last for small volumes, the chosen weight gradient, few output channels
  by taps).

* **Weight gradients** (`device="cpu"`). `Conv3d`'s default weight-gradient method, `"auto"`
  (`cpcbm_blocks.blocks.conv_weight_grad`), picks oneDNN's 3-D form or the depth-tap form by timing
  both on the first real backward of each problem. On `meta` nothing is timed: the plan uses the form
  this process has measured for the same problem and, for a problem not yet timed here, the depth-tap
  form, whose slice copies are the larger temporaries. A plan made in a fresh process is therefore an
  upper bound, and the same call can give a lower peak after a CPU training step in this process;
  `MemoryPlan.weight_grad_assumption` (a line of `render()`) says which applied.

What the plan does not see: allocator overheads (caching, fragmentation, page rounding), the CUDA
context and cuBLAS's workspaces, the Python process itself, and autocast. `dtype` is the dtype of a
model cast with `model.to(dtype)`, as pure low-precision training runs: parameters, gradients, Adam
state and activations all in it. Under `torch.autocast` the parameters, gradients and Adam state
stay float32 (take those figures from the `"fp32"` plan), the activations are mostly in the autocast
dtype, and autocast keeps a cache of low-precision weight copies; `meta` tensors cannot run under
autocast, so the plan does not model it. The tests compare the plan with a real CPU run;
`benchmarks/` compare the peak with a measured one.

```python
from cpcbm_blocks import UNetSpec
from cpcbm_blocks.memory import memory_plan

p = memory_plan(UNetSpec.default(), (1, 1, 8, 256, 256), checkpoint_levels=(1, 2))
print(p.render())
p.largest_batch(24 * 2**30)   # the largest batch whose predicted peak fits in 24 GiB
```
"""

import bisect
import math
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

from cpcbm_blocks.arguments import (
    as_enum,
    as_level_numbers,
    check_bool,
    check_int,
    check_number,
    check_optional_bool,
)
from cpcbm_blocks.blocks import conv_weight_grad
from cpcbm_blocks.blocks.attention import AttentionBackend
from cpcbm_blocks.blocks.attention import attention_backend as use_attention_backend
from cpcbm_blocks.blocks.conv_onednn import META_DEVICES, meta_stands_for, pointwise, runs_on_onednn
from cpcbm_blocks.contracts import shape_checks
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.layout import Op, Section, Step
from cpcbm_blocks.plan import Transition, plan
from cpcbm_blocks.recompute import selective_by_default
from cpcbm_blocks.spec import UNetSpec

__all__ = ["CPU_ATTENTION_FLOP_FORMULAS", "DEVICES", "DTYPES", "MemoryPlan", "StepCost", "cudnn_workspace_bytes",
           "memory_plan", "onednn_scratch_bytes"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtypes a plan can be made for, by the names the command line uses."""

DEVICES = META_DEVICES
"""What a plan can be made for: `"cpu"` counts oneDNN's blocked copies (see the module docs), `"cuda"`
cuDNN's workspace, with each convolution in the form a GPU runs."""

_aten = torch.ops.aten


def _raw(formula):
    """Mark a formula of torch's registry (already shape-wrapped) so `FlopCounterMode` takes it as is."""
    def counted(*args, **kwargs):
        return formula(*args, **kwargs)
    counted._get_raw = True
    return counted


CPU_ATTENTION_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _raw(sdpa_flop),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(sdpa_backward_flop),
}
"""The fused CPU attention kernel is missing from torch's FLOP registry; it does the work of the GPU
ones. Pass this as `FlopCounterMode(custom_mapping=...)` to count attention in a real CPU run."""

_FLOP_FORMULAS = {**flop_registry, **CPU_ATTENTION_FLOP_FORMULAS}

_BEFORE = -1  # owner of what runs before the first step (the timestep embedding)


@dataclass(frozen=True, kw_only=True)
class StepCost:
    """What one transition of the UNet costs in a training step (batch included)."""

    transition: Transition
    checkpointed: bool
    parameters: int
    """Parameters of the step's module (0 for a later use of weights shared with an earlier step)."""
    forward_flops: int
    backward_flops: int
    """Includes the recomputed forward when the step is checkpointed."""
    saved_bytes: int
    """Bytes of the tensors this step created that the autograd graph still holds after the forward."""
    attention_score_bytes: int
    """Bytes of one `batch x heads x n x m` score matrix of this step's attention, the largest score-shaped
    tensor its forward creates: what the naive backend materialises at once per attention call (its
    forward makes several in turn: the product, the scaled product, the softmax). 0 for a fused backend,
    which never materialises it, and for a step without attention. A transient: `saved_bytes` holds it
    too only where the step keeps its softmax for backward (`selective=False` with the naive backend)."""

    @property
    def step(self) -> Step:
        return self.transition.step

    @property
    def where(self) -> str:
        """The level the step belongs to, as used to find the dominant level: `level 3`, `mid`, `stem/head`."""
        if self.step.section is Section.MID:
            return "mid"
        if self.step.group == 0:
            return "stem/head"
        return f"level {self.step.group}"


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """The cost of one training step of a spec's UNet; see the module docs for what is measured."""

    spec: UNetSpec
    input_shape: tuple[int, int, int, int, int]
    dtype: str
    device: str
    """`"cpu"`: oneDNN's blocked copies count toward the peak; `"cuda"`: cuDNN's workspace does."""
    attention_backend: AttentionBackend
    checkpoint_levels: tuple[int, ...]
    checkpoint_mid: bool
    checkpoint_conditions: bool
    selective: bool
    """Selective recomputation of memory-bound operators in the steps not fully checkpointed."""
    text_tokens: int
    steps: tuple[StepCost, ...]
    parameter_count: int
    embedding_parameters: int
    """Parameters outside the transitions: the timestep embedding and, if any, the condition encoder."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    """Adam's two moment estimates (and its step counters)."""
    input_bytes: int
    """The input volume, its timesteps, the conditions (if any) and the regression target."""
    embedding_saved_bytes: int
    """Saved by what runs before the first step: the timestep embedding and the condition encoder."""
    embedding_forward_flops: int
    embedding_backward_flops: int
    """The embedding's backward FLOPs (its recomputation included when the conditions are checkpointed).
    With the steps' own, `parameter_count`, `saved_bytes`, `forward_flops` and `backward_flops` are the
    sums of the rows of `render()`'s table."""
    forward_flops: int
    backward_flops: int
    peak_bytes: int
    """Predicted peak of a steady-state training step (Adam state included)."""
    peak_phase: str
    """Where the peak is reached: `"forward"`, `"backward"` or `"optimizer"` (Adam's update)."""
    peak_step: int | None
    """The index into `steps` of the step whose forward (or, in backward, whose autograd nodes) runs at
    the peak; None before the first step (timestep embedding, condition encoder), at the loss, or in
    the optimizer."""
    peak_operator: str
    """The aten operator running at the peak, e.g. `convolution_backward.default`."""
    peak_scratch_bytes: int
    """oneDNN's blocked copies (a CPU plan) or cuDNN's workspace (a CUDA plan) inside that operator, on top
    of the live tensors."""
    weight_grad_method: str
    """`set_weight_grad_method`'s choice when the plan was made: `"auto"` (the default), `"aten"` or
    `"depth_taps"` (CPU plans; a CUDA plan runs the GPU's weight gradient whatever it is)."""
    weight_grad_problems_timed: int
    """How many weight-gradient problems this process had timed under `"auto"` when the plan was made;
    those are planned in the form measured fastest, any other in the depth-tap form (module docs)."""
    planning_seconds: float

    @property
    def weight_grad_assumption(self) -> str:
        """Which weight-gradient form the plan assumed for `Conv3d`s not yet timed in this process, in words."""
        if self.device != "cpu":
            return "as a GPU computes them (aten's convolution_backward); the CPU forms and their timing do not apply"
        if self.weight_grad_method != "auto":
            return f"the {self.weight_grad_method!r} form throughout, pinned by set_weight_grad_method"
        assumed = ("the depth-tap form, the one with the larger temporaries, so the peak is an upper bound "
                   "(a CPU training step in this process times the forms; set_weight_grad_method pins one)")
        if self.weight_grad_problems_timed == 0:
            return f"none timed in this process yet: every convolution assumed in {assumed}"
        return (f"the form timed fastest where this process has timed the problem ({self.weight_grad_problems_timed} "
                f"timed so far, of any shape); any convolution not yet timed assumed in {assumed}")

    @property
    def not_counted(self) -> str:
        """What a real process needs beyond `peak_bytes` on the plan's device, in words."""
        if self.device == "cpu":
            return ("the Python/torch process itself (with what torch loads on the first step, such as torch._dynamo, "
                    "which a torch optimizer imports) and the memory the C allocator (malloc) keeps of freed blocks")
        return ("the CUDA context, cuBLAS's workspaces (made by the process's first matrix product, then kept) and the "
                "memory the caching allocator reserves beyond its tensors")

    @property
    def peak_at(self) -> str:
        """Where the peak is reached, in words: phase, step, operator and the share of oneDNN's copies or
        cuDNN's workspace."""
        if self.peak_phase == "optimizer":
            return "in Adam's update"
        if self.peak_step is None:
            where = "before the first step (timestep embedding, condition encoder) or at the loss"
        else:
            where = f"of step {self.peak_step + 1} ({self.steps[self.peak_step].step.describe()})"
        scratch = "oneDNN's blocked copies" if self.device == "cpu" else "cuDNN's workspace"
        copies = f", {_mib(self.peak_scratch_bytes):.0f} MiB of it {scratch}" if self.peak_scratch_bytes else ""
        return f"in the {self.peak_phase} {where}, at {self.peak_operator}{copies}"

    @property
    def saved_bytes(self) -> int:
        """All activations held for backward at the end of the forward."""
        return self.embedding_saved_bytes + sum(s.saved_bytes for s in self.steps)

    @property
    def attention_score_bytes(self) -> int:
        """The largest single attention score matrix of any step (`StepCost.attention_score_bytes`): what the
        naive backend holds at once for one attention call (a transient, also counted in `saved_bytes` where a
        step keeps its softmax: `selective=False`). 0 for a fused backend."""
        return max((s.attention_score_bytes for s in self.steps), default=0)

    @property
    def embedding_name(self) -> str:
        """What runs before the first step, as the table's row names it."""
        return "timestep embedding" if self.spec.conditioning is None else "embedding + condition encoder"

    def by_level(self) -> dict[str, dict[str, int]]:
        """Saved bytes, FLOPs and parameters summed per level (down and up together), `mid` and `stem/head`."""
        levels: dict[str, dict[str, int]] = {}
        for s in self.steps:
            row = levels.setdefault(s.where, {"saved_bytes": 0, "flops": 0, "parameters": 0})
            row["saved_bytes"] += s.saved_bytes
            row["flops"] += s.forward_flops + s.backward_flops
            row["parameters"] += s.parameters
        return levels

    def dominant_level(self) -> str:
        """The level that holds the most activation memory for backward."""
        levels = self.by_level()
        return max(levels, key=lambda name: levels[name]["saved_bytes"])

    def largest_batch(self, budget_bytes: float) -> int:
        """The largest batch whose predicted peak is at most `budget_bytes` (0 if not even batch 1 fits).

        The peaks compared are this plan's, for its `device`: tensors, and on `"cpu"` oneDNN's blocked
        copies, on `"cuda"` cuDNN's workspace. Neither counts what a real process adds (`not_counted`): on
        CPU the Python/torch process itself and the memory the C allocator keeps of freed blocks, on
        CUDA the CUDA context, cuBLAS's workspaces and the caching allocator's reserve. Leave room for them
        in `budget_bytes`, a positive, finite number of bytes (a float such as `24 * 2.0**30` is fine;
        it is rounded down). On CPU the process's share is its RSS after one small training step (what
        torch loads on first use is in it), as `benchmarks/bench_memory.py` measures it.

        Found with real plans, not extrapolated: activations grow about linearly with the batch, so
        a line through the plans of batches 1 and 2 gives a guess, a line through batch 1 and that
        guess a better one, and plans of it and its neighbour confirm it (it fits, one more does
        not). A wrong guess is corrected by doubling steps and bisection. Usually three to four
        plans, one to two seconds each at full size.
        """
        budget_bytes = int(check_number("largest_batch(budget_bytes=...)", budget_bytes, above=0, error=InputError,
                                        fix="Pass a number of bytes, e.g. largest_batch(24 * 2**30) for 24 GiB."))
        peaks: dict[int, int] = {self.input_shape[0]: self.peak_bytes}

        def fits(batch: int) -> bool:
            if batch not in peaks:
                peaks[batch] = self.with_batch(batch).peak_bytes
            return peaks[batch] <= budget_bytes

        def line_through(batch: int) -> int:  # where the line through batches 1 and `batch` meets the budget
            fits(batch)
            growth = max(peaks[batch] - peaks[1], 1)
            return max(1, 1 + (budget_bytes - peaks[1]) * (batch - 1) // growth)

        if not fits(1):
            return 0
        guess = line_through(2)
        if guess > 2:
            guess = line_through(guess)
        if fits(guess):
            low, step = guess, 1
            while fits(low + step):
                low, step = low + step, step * 2
            high = low + step
        else:
            high, step = guess, 1
            while high - step > 1 and not fits(high - step):
                high, step = high - step, step * 2
            low = max(1, high - step)
        while high - low > 1:  # low fits, high does not
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def with_batch(self, batch: int) -> "MemoryPlan":
        """The same plan for another batch size."""
        return memory_plan(self.spec, (batch, *self.input_shape[1:]), dtype=self.dtype, device=self.device,
                           checkpoint_levels=self.checkpoint_levels, checkpoint_mid=self.checkpoint_mid,
                           checkpoint_conditions=self.checkpoint_conditions, selective=self.selective,
                           attention_backend=self.attention_backend, text_tokens=self.text_tokens)

    def to_dict(self) -> dict:
        """Plain JSON-able data: totals, per-level sums and one row per transition."""
        return {
            "input_shape": list(self.input_shape), "dtype": self.dtype, "device": self.device,
            "attention_backend": self.attention_backend.value,
            "checkpoint_levels": list(self.checkpoint_levels), "checkpoint_mid": self.checkpoint_mid,
            "checkpoint_conditions": self.checkpoint_conditions, "selective": self.selective,
            "parameter_count": self.parameter_count, "parameter_bytes": self.parameter_bytes,
            "gradient_bytes": self.gradient_bytes, "optimizer_bytes": self.optimizer_bytes,
            "input_bytes": self.input_bytes, "saved_bytes": self.saved_bytes,
            "embedding_parameters": self.embedding_parameters, "embedding_saved_bytes": self.embedding_saved_bytes,
            "embedding_forward_flops": self.embedding_forward_flops,
            "embedding_backward_flops": self.embedding_backward_flops,
            "attention_score_bytes": self.attention_score_bytes, "forward_flops": self.forward_flops,
            "backward_flops": self.backward_flops, "peak_bytes": self.peak_bytes, "peak_at": self.peak_at,
            "peak_scratch_bytes": self.peak_scratch_bytes,
            "not_counted": self.not_counted, "weight_grad_method": self.weight_grad_method,
            "weight_grad_problems_timed": self.weight_grad_problems_timed,
            "weight_grad_assumption": self.weight_grad_assumption,
            "dominant_level": self.dominant_level(), "levels": self.by_level(),
            "planning_seconds": round(self.planning_seconds, 3),
            "steps": [{"where": s.step.describe(), "transition": s.transition.render(), "module": s.step.module_key,
                       "checkpointed": s.checkpointed, "parameters": s.parameters, "forward_flops": s.forward_flops,
                       "backward_flops": s.backward_flops, "saved_bytes": s.saved_bytes,
                       "attention_score_bytes": s.attention_score_bytes} for s in self.steps],
        }

    def render(self) -> str:
        """A table per transition (row 0: what runs before the first step), per-level sums and the totals,
        as `cpcbm-blocks plan` prints them. The totals are the sums of the table's rows."""

        def row(index: int, where: str, transition: str, checkpointed: bool, parameters: int, forward_flops: int,
                backward_flops: int, saved_bytes: int, score_bytes: int) -> str:
            return (f"{index:>3}  {where:34} {transition:52} {'yes' if checkpointed else '':4} {parameters:>11,} "
                    f"{forward_flops / 1e9:>10.2f} {backward_flops / 1e9:>10.2f} {_mib(saved_bytes):>10.1f} "
                    f"{_mib(score_bytes):>16.1f}")

        lines = [(f"{'#':>3}  {'where':34} {'transition':52} {'ckpt':4} {'params':>11} {'fwd GFLOP':>10} "
                  f"{'bwd GFLOP':>10} {'saved MiB':>10} {'1 score mat MiB':>16}")]
        lines.append(row(0, self.embedding_name, "(before step 1)",
                         self.checkpoint_conditions and self.spec.conditioning is not None, self.embedding_parameters,
                         self.embedding_forward_flops, self.embedding_backward_flops, self.embedding_saved_bytes, 0))
        for i, s in enumerate(self.steps, start=1):
            lines.append(row(i, s.step.describe(), s.transition.render(), s.checkpointed, s.parameters,
                             s.forward_flops, s.backward_flops, s.saved_bytes, s.attention_score_bytes))
        lines.append("")
        lines.append(f"{'level':10} {'saved MiB':>10} {'GFLOP (fwd+bwd)':>16} {'params':>11}")
        for name, level in self.by_level().items():
            lines.append(f"{name:10} {_mib(level['saved_bytes']):>10.1f} {level['flops'] / 1e9:>16.2f} "
                         f"{level['parameters']:>11,}")
        lines.append(f"{'embedding':10} {_mib(self.embedding_saved_bytes):>10.1f} "
                     f"{(self.embedding_forward_flops + self.embedding_backward_flops) / 1e9:>16.2f} "
                     f"{self.embedding_parameters:>11,}")
        lines.append("")
        lines.append(f"parameters        {self.parameter_count:,} ({_mib(self.parameter_bytes):.1f} MiB; "
                     f"gradients {_mib(self.gradient_bytes):.1f} MiB; Adam state {_mib(self.optimizer_bytes):.1f} MiB)")
        lines.append(f"FLOPs             forward {self.forward_flops / 1e9:.2f} G, backward {self.backward_flops / 1e9:.2f} G")
        lines.append(f"saved for backward {_mib(self.saved_bytes):.1f} MiB; dominant level: {self.dominant_level()}")
        if self.attention_score_bytes:
            lines.append(f"attention score matrix, largest: {_mib(self.attention_score_bytes):.1f} MiB (batch x heads x n x m; "
                         "the naive backend materialises it at each attention call, fused SDPA never does; "
                         "in the saved figure only where a step keeps its softmax, as with selective=False)")
        else:
            lines.append(f"attention score matrix: none materialised ({self.attention_backend.value} backend)")
        lines.append(f"weight gradients  {self.weight_grad_assumption}")
        counted = ("tensors and oneDNN's blocked copies" if self.device == "cpu"
                   else "tensors and cuDNN's workspace; no CUDA context")
        lines.append(f"predicted peak    {self.peak_bytes / 2**30:.3f} GiB for a training step with Adam "
                     f"on {self.device} "
                     f"({counted}; no allocator cache)")
        lines.append(f"peak reached      {self.peak_at}")
        return "\n".join(lines)


def _mib(n: int) -> float:
    return n / 2**20


def _group_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, n: int, c: int, hxw: int, groups: int,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty((n, groups)), x.new_empty((n, groups))


def _group_norm_backward(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, n: int,
                         c: int, hxw: int, groups: int, mask: list[bool]) -> tuple[Tensor | None, ...]:
    def parameter_grad() -> Tensor:
        return torch.empty_like(weight) if weight is not None else x.new_empty((c,))

    return (torch.empty_like(x) if mask[0] else None, parameter_grad() if mask[1] else None,
            parameter_grad() if mask[2] else None)


def _foreach(tensors, *args, **kwargs) -> list[Tensor]:
    return [torch.empty_like(t) for t in tensors]


def _foreach_in_place(tensors, *args, **kwargs) -> None:
    return None


_SHAPE_ONLY = {torch.ops.aten.native_group_norm: _group_norm,
               torch.ops.aten.native_group_norm_backward: _group_norm_backward,
               **{getattr(torch.ops.aten, f"_foreach_{name}"): _foreach
                  for name in ("add", "addcdiv", "addcmul", "div", "mul", "neg", "sqrt", "sub")},
               **{getattr(torch.ops.aten, f"_foreach_{name}_"): _foreach_in_place
                  for name in ("add", "addcdiv", "addcmul", "div", "lerp", "mul", "neg", "sqrt", "sub", "copy",
                               "zero", "maximum", "reciprocal")}}
"""Operators whose meta kernels are Python decompositions (most of a plan's run time) but whose outputs
are plain: group norm (its output like its input, statistics per sample and group) and Adam's
`_foreach` arithmetic (a new tensor like each input, or nothing when in place). On meta the
decomposition computes exactly these shapes, dtypes and layouts, only slower;
`test_shape_only_kernels_match_the_meta_decompositions` holds them to it."""


_ONEDNN_CHANNEL_BLOCK = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
"""oneDNN's kernels work on channels in blocks of one vector register, padding the last block: 16 float32
on AVX-512 (`nCdhw16c`), 8 on AVX2."""


def _blocked_bytes(t: Tensor) -> int:
    """Bytes of `t` as oneDNN's channel-blocked copy; 0 if `t` is channels-last, which oneDNN reads as it is."""
    if _is_channels_last(t):
        return 0
    channels = -(-t.shape[1] // _ONEDNN_CHANNEL_BLOCK) * _ONEDNN_CHANNEL_BLOCK
    return t.numel() // max(t.shape[1], 1) * channels * t.element_size()


def _padding_bytes(t: Tensor) -> int:
    """What the blocked copy of `t` adds to `t` itself: its padded channels (0 for a channels-last `t`)."""
    return max(0, _blocked_bytes(t) - t.numel() * t.element_size())


def _channels_last(t: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if t.dim() == 5 else torch.channels_last


def _is_channels_last(t: Tensor) -> bool:
    """A 4-D or 5-D tensor laid out channels-last (and not also plain: one channel or one voxel)."""
    return t.dim() >= 4 and t.is_contiguous(memory_format=_channels_last(t)) and not t.is_contiguous()


def _copied_bytes(t: Tensor) -> int:
    """A strided view (say, depth moved last) is first made contiguous: one plain copy."""
    dense = t.is_contiguous() or t.is_contiguous(memory_format=_channels_last(t))
    return 0 if dense else t.numel() * t.element_size()


def _columns_bytes(x: Tensor, weight: Tensor, out_spatial: tuple[int, ...]) -> int:
    """PyTorch's own `slow_conv` kernels unfold the input into columns: `C_in * taps` rows per output voxel."""
    return x.shape[0] * weight.shape[1] * math.prod(weight.shape[2:]) * math.prod(out_spatial) * x.element_size()


def _onednn_forward_scratch(x: Tensor, out: Tensor) -> int:
    """A oneDNN forward: one blocked copy at a time, the padded result, and a plain copy of a strided input."""
    return max(_blocked_bytes(x), _blocked_bytes(out)) + _padding_bytes(out) + _copied_bytes(x)


def onednn_scratch_bytes(func, args: tuple, out) -> int:
    """Bytes a CPU convolution allocates beyond its outputs on oneDNN, for `aten.convolution` (a transposed
    one as the input gradient it computes: `Conv3d`'s, where its input was saved apart),
    `aten.mkldnn_convolution` and `aten.convolution_backward` (0 for any other operator, or where PyTorch
    runs its own kernel).

    Measured for float32 on AVX-512 with PyTorch 2.13 at activations of tens of MiB, where it matters
    (`tests/test_memory.py`; other dtypes are assumed to behave alike), with `blk(t)` the bytes of `t`
    with its channels padded to oneDNN's channel block (16 on AVX-512, 8 on AVX2; 0 for a
    channels-last `t`) and `pad(t) = blk(t) - bytes(t)`:

    * forward, and the input gradient alone: `max(blk(in), blk(out)) + pad(out)` where
      `in`/`out` are the input and output (for the input gradient: the output gradient and the
      input gradient): one blocked copy at a time, plus the padded result before it is written back;
    * a weight gradient: `blk(input) + blk(grad_out)`, both blocked copies at once;
    * plus a plain copy of any operand that is a strided view.

    Where PyTorch keeps a convolution to itself: its `slow_conv` kernels unfold the input into
    columns (`C_in * taps` values per output voxel), and a pointwise one on one thread computes the
    input gradient through one temporary of its size.
    """
    if func is _aten.mkldnn_convolution.default:  # oneDNN whatever the sizes (conv3d's small batch-1 volumes)
        return _onednn_forward_scratch(args[0], out)
    if func is _aten.convolution.default:
        x, weight, stride, transposed, groups = args[0], args[1], args[3], args[6], args[8]
        if transposed:  # an input gradient (Conv3d's, once its remade input is gone): as convolution_backward's
            return onednn_scratch_bytes(_aten.convolution_backward.default,
                                        (x, out, weight, None, stride, None, None, None, None, groups,
                                         [True, False, False]), (out,))
        if not runs_on_onednn(x, weight, stride, groups):
            return 0 if pointwise(weight, stride) else _columns_bytes(x, weight, tuple(out.shape[2:]))
        return _onednn_forward_scratch(x, out)
    if func is _aten.convolution_backward.default:
        grad_out, x, weight, stride, groups, mask = args[0], args[1], args[2], args[4], args[9], args[10]
        if not runs_on_onednn(x, weight, stride, groups):
            if pointwise(weight, stride):  # the input gradient goes through one temporary of its size
                return out[0].untyped_storage().nbytes() if mask[0] else 0
            return _columns_bytes(x, weight, tuple(grad_out.shape[2:]))
        scratch = 0
        if mask[0]:
            scratch = max(_blocked_bytes(grad_out), _blocked_bytes(out[0])) + _padding_bytes(out[0])
        if mask[1]:
            scratch = max(scratch, _blocked_bytes(x) + _blocked_bytes(grad_out))
        return scratch + _copied_bytes(grad_out) + _copied_bytes(x)
    return 0


def _nhwc_copies_bytes(*tensors: Tensor) -> int:
    """Bytes of channels-last copies of those `tensors` that are not channels-last already."""
    return sum(t.numel() * t.element_size() for t in tensors if not _is_channels_last(t))


def cudnn_workspace_bytes(func, args: tuple, out) -> int:
    """Bytes of cuDNN's workspace inside a CUDA convolution, beyond its outputs, for `aten.convolution`
    and `aten.convolution_backward` (0 for any other operator).

    Read off the CUDA caching allocator's history of a full-size training step of the default UNet
    (`benchmarks/bench_gpu_step.py --snapshot`: float32 with TF32, PyTorch's default, PyTorch 2.11 and
    cuDNN on an H200), where every convolution's workspace came to the channels-last copies of its
    operands: a call transposes what it reads and what it writes, weights included, to NDHWC and
    back. So, counting each operand that is not channels-last already:

    * forward: `input + output + weight`;
    * input gradient: `grad_out + grad_input + weight`; weight gradient, run after it and in a
      workspace of its own: `input + grad_out + weight` (cuDNN took up to 5 MiB more there, for its
      partial sums), so a backward that computes both holds the larger of the two.

    Other dtypes are assumed to behave alike (bfloat16's measured peaks agree); cuDNN may pick other
    algorithms with other workspaces on other GPUs or versions.
    """
    if func is _aten.convolution.default:
        return _nhwc_copies_bytes(args[0], out, args[1])
    if func is _aten.convolution_backward.default:
        grad_out, x, weight, mask = args[0], args[1], args[2], args[10]
        workspace = _nhwc_copies_bytes(grad_out, out[0], weight) if mask[0] else 0
        if mask[1]:
            workspace = max(workspace, _nhwc_copies_bytes(x, grad_out, weight))
        return workspace
    return 0


class _Recorder(TorchDispatchMode):
    """Counts FLOPs and follows every tensor storage from creation to release, by owner (a step);
    `scratch(func, args, out)` gives the bytes an operator holds only while it runs (none by default)."""

    def __init__(self, *, scratch: Callable[[object, tuple, object], int] | None = None) -> None:
        super().__init__()
        self.scratch = scratch
        self.owner = _BEFORE
        # (first autograd sequence number, owner): whose forward created the autograd nodes from there on
        self.owner_from: list[tuple[int, int]] = [(-1, _BEFORE)]
        self.live: dict[int, tuple[int, int, str]] = {}  # storage id -> (bytes, owner, phase)
        self.live_bytes = 0
        self.excluded: set[int] = set()
        self.operator = "(start)"  # the operator running, for `peak_where`
        self.peak_by_phase: dict[str, int] = {}
        # phase -> (owner, operator, scratch bytes): where that phase's peak was reached
        self.peak_where: dict[str, tuple[int, str, int]] = {}
        self.phase = "forward"
        self.flops: dict[tuple[str, int], int] = {}
        self.score_bytes: dict[int, int] = {}
        self.score_shapes: dict[int, tuple[int, int, int]] = {}  # attention step -> (n, m, b * heads * n * m)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.phase == "backward":
            self._owner_of_running_node()
        shape_only = _SHAPE_ONLY.get(func._overloadpacket)
        if shape_only is not None and all(t.is_meta for t in tree_leaves(args) if isinstance(t, Tensor)):
            out = shape_only(*args, **kwargs)
        else:  # Adam's step counters live on the CPU: their values matter
            out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            key = (self.phase, self.owner)
            self.flops[key] = self.flops.get(key, 0) + formula(*args, **kwargs, out_val=out)
        self.operator = func.__name__
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self._track(tensor)
        if self.scratch is not None:  # freed inside the operator: only the peak sees it
            scratch = self.scratch(func, args, out)
            if scratch:
                self._reach(self.live_bytes + scratch, scratch)
        return out

    def _reach(self, live_bytes: int, scratch: int = 0) -> None:
        """Raise the current phase's peak to `live_bytes` if higher, remembering where it was reached."""
        if live_bytes > self.peak_by_phase.get(self.phase, -1):
            self.peak_by_phase[self.phase] = live_bytes
            self.peak_where[self.phase] = (self.owner, self.operator, scratch)

    def set_owner(self, owner: int) -> None:
        """The forward of `owner` starts: what it creates, and the autograd nodes it records, are its."""
        self.owner = owner
        self.owner_from.append((torch._C._autograd._get_sequence_nr(), owner))

    def _owner_of_running_node(self) -> None:
        """In backward, the owner is whoever's forward recorded the autograd node being run.

        Nodes run in reverse order of creation, but not step by step: the condition encoder's
        backward, say, runs after the stem's although its outputs fed steps deep in the network.
        A node's sequence number says which forward recorded it; gradient accumulation into
        parameters has none and keeps the current owner.
        """
        node = torch._C._current_autograd_node()
        if node is None or node._sequence_nr() >= 2**63:  # AccumulateGrad: UINT64_MAX
            return
        sequence = node._sequence_nr()
        self.owner = self.owner_from[bisect.bisect_right(self.owner_from, (sequence, math.inf)) - 1][1]

    def exclude(self, tensors: Iterable[Tensor]) -> None:
        """Storages that exist before the step (parameters, inputs): views of them allocate nothing."""
        self.excluded.update(t.untyped_storage()._cdata for t in tensors)

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.excluded:
            return
        nbytes = storage.nbytes()
        self.live[key] = (nbytes, self.owner, self.phase)
        self.live_bytes += nbytes
        self._reach(self.live_bytes)
        weakref.finalize(storage, self._release, key)
        scores = self.score_shapes.get(self.owner)
        if (scores is not None and self.phase == "forward" and tensor.ndim >= 3
                and tuple(tensor.shape[-2:]) == scores[:2] and tensor.numel() == scores[2]):
            # One matrix per call: the product, the scaled product and the softmax are made in turn.
            self.score_bytes[self.owner] = max(self.score_bytes.get(self.owner, 0), nbytes)

    def _release(self, key: int) -> None:
        nbytes, _, _ = self.live.pop(key)
        self.live_bytes -= nbytes

    def set_phase(self, phase: str) -> None:
        self.phase, self.operator = phase, "(start)"
        self._reach(self.live_bytes)


def _owner_hooks(model, recorder: _Recorder) -> list:
    """Point the recorder at the step whose forward is running (backward: see `_Recorder`)."""
    steps = model.steps
    positions: dict[str, list[int]] = {}
    for position, step in enumerate(steps):
        positions.setdefault(step.module_key, []).append(position)
    uses: dict[str, int] = {}
    handles = []

    def in_backward() -> bool:  # a checkpointed step recomputing its forward
        return torch._C._current_graph_task_id() != -1

    for key, module in model.blocks.items():
        def pre(module, args, key=key):
            if in_backward():
                return
            use = uses.get(key, 0)
            uses[key] = use + 1
            recorder.set_owner(positions[key][use % len(positions[key])])

        def post(module, args, output):
            if not in_backward():
                recorder.set_owner(recorder.owner + 1)  # a skip concatenated before the next step belongs to it

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def _conditions(spec: UNetSpec, input_shape: tuple[int, ...], dtype: torch.dtype, text_tokens: int) -> dict[str, Tensor]:
    """Meta conditions of the shapes a conditioned spec takes (none for an unconditioned one)."""
    cond = spec.conditioning
    if cond is None:
        return {}
    conditions = {}
    if cond.has_text:
        conditions["text"] = torch.empty(input_shape[0], text_tokens, cond.text_channels, dtype=dtype)
    if cond.has_images:
        conditions["cond_images"] = torch.empty(input_shape[0], cond.image_channels, *input_shape[2:], dtype=dtype)
    return conditions


def memory_plan(spec: UNetSpec, input_shape: tuple[int, ...], *, dtype: str = "fp32", device: str = "cpu",
                checkpoint_levels: Iterable[int] = (), checkpoint_mid: bool = False, checkpoint_conditions: bool = False,
                selective: bool | None = None, attention_backend: AttentionBackend | str = AttentionBackend.SDPA,
                text_tokens: int = 77) -> MemoryPlan:
    """Plan one training step of `spec`'s UNet on a batch of `input_shape` (B, C, D, H, W).

    **Arguments:**

    - `spec`: the network.
    - `input_shape`: the training batch's shape; the batch size is its first entry.
    - `dtype`: `"fp32"`, `"bf16"` or `"fp16"`: the dtype of a model cast with `model.to(dtype)`, so
      parameters, gradients, Adam state and activations are all in it. Under `torch.autocast` (mixed
      precision, as the README trains) parameters, gradients and Adam state stay float32: take those
      figures from the `"fp32"` plan; activations are then mostly in the autocast dtype (see the
      module docs: autocast is not modelled).
    - `device`: `"cpu"` (the default) adds oneDNN's blocked copies of each convolution's operands to
      the peak (see the module docs); `"cuda"` adds cuDNN's workspace instead, and runs each
      convolution in the form a GPU runs (none of the CPU-only forms).
    - `checkpoint_levels`, `checkpoint_mid`, `checkpoint_conditions`: gradient checkpointing, as
      `UNet3D.set_gradient_checkpointing` sets it: a tuple of level numbers such as `(1, 2)`, and two
      switches (`checkpoint_conditions` does nothing for a spec without conditioning, as in `UNet3D`).
    - `selective`: selective recomputation of memory-bound operators in every other step; `None`,
      the default, decides by `device` as `UNet3D` does (on for `"cpu"`, off for `"cuda"`; see
      `cpcbm_blocks.recompute.selective_by_default`). The plan's `selective` says which applied.
    - `attention_backend`: `"sdpa"` (fused, the default) or `"naive"` (materialises the scores).
    - `text_tokens`: tokens per text condition, for a spec conditioned on text (CLIP: 77); positive.

    **Weight gradients (CPU plans).** A convolution this process has not timed yet is planned in the
    depth-tap form, so in a fresh process the peak is an upper bound (module docs, "Weight
    gradients"); `MemoryPlan.weight_grad_assumption` says which applied, and `set_weight_grad_method`
    pins a form.
    """
    from cpcbm_blocks.unet import UNet3D  # unet imports blocks; keep this module importable on its own

    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}. Use e.g. dtype='bf16'.")
    if device not in DEVICES:
        raise InputError(f"device: expected one of {list(DEVICES)}, got {device!r}. "
                         "Use device='cuda' to plan a GPU step.")
    backend = as_enum("attention_backend", attention_backend, AttentionBackend, error=InputError)
    text_tokens = check_int("memory_plan(text_tokens=...)", text_tokens, minimum=1, error=InputError,
                            fix="Pass e.g. text_tokens=77 (CLIP's context length).")
    expected = plan(spec, tuple(input_shape))
    levels = as_level_numbers("memory_plan(checkpoint_levels=...)", checkpoint_levels, levels=len(spec.levels),
                              error=InputError)
    for name, value in (("checkpoint_mid", checkpoint_mid), ("checkpoint_conditions", checkpoint_conditions)):
        check_bool(f"memory_plan({name}=...)", value, error=InputError)
    check_optional_bool("memory_plan(selective=...)", selective, error=InputError,
                        none_means="as UNet3D trains on `device`, on for cpu and off for cuda")
    started = time.perf_counter()
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = UNet3D(spec).to(torch_dtype).set_gradient_checkpointing(
            levels=levels, mid=checkpoint_mid, conditions=checkpoint_conditions, selective=selective)
        x = torch.empty(expected.input_shape, dtype=torch_dtype)
        t = torch.empty(expected.input_shape[0])
        target = torch.empty(expected.output_shape, dtype=torch_dtype)
        conditions = _conditions(spec, expected.input_shape, torch_dtype, text_tokens)
    if selective is None:  # as the model decides it in the planned step, for a step on `device`
        with meta_stands_for(device):
            selective = selective_by_default(x)
    parameters = list(model.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
    inputs = [x, t, target, *conditions.values()]
    input_bytes = sum(v.numel() * v.element_size() for v in inputs)

    recorder = _Recorder(scratch=onednn_scratch_bytes if device == "cpu" else cudnn_workspace_bytes)
    recorder.exclude([*parameters, *model.buffers(), *inputs])
    for position, transition in enumerate(expected.transitions):
        if transition.step.op is Op.ATTN:
            channels, d, h, w = transition.in_shape
            n = d * h * w
            recorder.score_shapes[position] = (n, n, expected.batch_size * (channels // spec.head_channels) * n * n)
    handles = _owner_hooks(model, recorder)
    # Adam as torch runs it by default on the device planned for (module docs, "Adam's update").
    optimizer = torch.optim.Adam(parameters, foreach=device == "cuda")
    try:
        with recorder, shape_checks(False), use_attention_backend(backend), meta_stands_for(device):
            out = model(x, t, **conditions)
            recorder.set_owner(len(expected.transitions))  # the loss
            saved = {key: owner for key, (_, owner, phase) in recorder.live.items() if phase == "forward"}
            saved.pop(out.untyped_storage()._cdata, None)
            saved_by_owner: dict[int, int] = {}
            for key, owner in saved.items():
                saved_by_owner[owner] = saved_by_owner.get(owner, 0) + recorder.live[key][0]
            loss = torch.nn.functional.mse_loss(out, target)
            recorder.set_phase("backward")
            loss.backward()
            del out, loss
            gradient_bytes = sum(p.grad.untyped_storage().nbytes() for p in parameters if p.grad is not None)
            before_update = max(recorder.peak_by_phase.values())
            recorder.set_phase("optimizer")
            optimizer.step()
            optimizer_bytes = sum(v.untyped_storage().nbytes() for state in optimizer.state.values()
                                  for v in state.values() if isinstance(v, Tensor) and v.device.type == "meta")
            during_update = recorder.peak_by_phase["optimizer"]
    finally:
        for handle in handles:
            handle.remove()
    # CPU step counters of Adam are a few bytes; the meta state tensors are the moments.
    peak = parameter_bytes + input_bytes + max(before_update + optimizer_bytes, during_update)
    if before_update + optimizer_bytes >= during_update:
        peak_phase = max((phase for phase in recorder.peak_by_phase if phase != "optimizer"),
                         key=recorder.peak_by_phase.__getitem__)
    else:
        peak_phase = "optimizer"
    peak_owner, peak_operator, peak_scratch = recorder.peak_where[peak_phase]

    params_by_key = {key: sum(p.numel() for p in module.parameters()) for key, module in model.blocks.items()}
    seen: set[str] = set()
    costs = []
    for position, transition in enumerate(expected.transitions):
        key = transition.step.module_key
        costs.append(StepCost(
            transition=transition, checkpointed=position in model._checkpointed,
            parameters=0 if key in seen else params_by_key[key],
            forward_flops=recorder.flops.get(("forward", position), 0),
            backward_flops=recorder.flops.get(("backward", position), 0),
            saved_bytes=saved_by_owner.get(position, 0),
            attention_score_bytes=recorder.score_bytes.get(position, 0)))
        seen.add(key)
    forward_flops = sum(v for (phase, _), v in recorder.flops.items() if phase == "forward")
    backward_flops = sum(v for (phase, _), v in recorder.flops.items() if phase == "backward")
    return MemoryPlan(
        spec=spec, input_shape=expected.input_shape, dtype=dtype, device=device, attention_backend=backend,
        checkpoint_levels=levels,
        checkpoint_mid=checkpoint_mid, checkpoint_conditions=checkpoint_conditions, selective=selective,
        text_tokens=text_tokens, steps=tuple(costs), parameter_count=sum(p.numel() for p in parameters),
        embedding_parameters=sum(p.numel() for p in parameters) - sum(params_by_key.values()),
        parameter_bytes=parameter_bytes, gradient_bytes=gradient_bytes, optimizer_bytes=optimizer_bytes,
        input_bytes=input_bytes, embedding_saved_bytes=saved_by_owner.get(_BEFORE, 0),
        embedding_forward_flops=recorder.flops.get(("forward", _BEFORE), 0),
        embedding_backward_flops=recorder.flops.get(("backward", _BEFORE), 0),
        forward_flops=forward_flops, backward_flops=backward_flops, peak_bytes=peak, peak_phase=peak_phase,
        peak_step=peak_owner if 0 <= peak_owner < len(costs) and peak_phase != "optimizer" else None,
        peak_operator=peak_operator, peak_scratch_bytes=peak_scratch,
        weight_grad_method=conv_weight_grad.weight_grad_method(),
        weight_grad_problems_timed=conv_weight_grad.timed_problem_count(),
        planning_seconds=time.perf_counter() - started)
