"""The memory/FLOP planner: planned on `meta`, checked against real CPU runs of the same spec."""

import gc
import subprocess
import sys
import time
import types

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from cpcbm_blocks import InputError, LevelSpec, MidSpec, UNet3D, UNetSpec, attention_backend, shape_checks
from cpcbm_blocks.layout import Section
from cpcbm_blocks.measure import held_for_backward, malloc_bytes_in_use, peak_rss_bytes
from cpcbm_blocks.memory import (
    CPU_ATTENTION_FLOP_FORMULAS,
    DEVICES,
    MemoryPlan,
    _conditions,
    cudnn_workspace_bytes,
    memory_plan,
    onednn_scratch_bytes,
)

from .conftest import randomize_


def _measure_spec() -> UNetSpec:
    """Wide enough that tensors, not the autograd graph's own small objects, dominate what is held."""
    # Planar kernels throughout: PyTorch's 2-D convolutions are fast on CPU at these small sizes.
    return UNetSpec(levels=(LevelSpec(channels=32, stride=(2, 2, 2), kernel_size=(1, 3, 3)),
                            LevelSpec(channels=32, attention=True, stride=(1, 2, 2), kernel_size=(1, 3, 3))),
                    mid=MidSpec(kernel_size=(1, 3, 3)), num_groups=8, head_channels=8, time_embedding_channels=32)


@pytest.mark.parametrize("switches", [{}, {"levels": (1,), "mid": True}, {"selective": False}],
                         ids=["selective", "checkpointed", "plain"])
def test_planned_saved_activations_equal_what_a_real_cpu_forward_holds_within_5_percent(switches):
    """Measured independently of the planner: what malloc holds after a forward with grad, minus
    what it holds after the same forward without grad (both keep only the output)."""
    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to measure what a CPU forward holds")
    # 64x64: tensors of 4 MiB and more, so that the autograd graph's own small objects stay in the noise
    spec, shape = _measure_spec(), (1, 1, 8, 64, 64)
    torch.manual_seed(0)
    model = randomize_(UNet3D(spec), scale=0.05).set_gradient_checkpointing(**switches)
    x, t = torch.randn(shape), torch.tensor([3.0])
    model(x, t).sum().backward()  # warm up: one-time allocations of the kernels are not activations
    measured = held_for_backward(model, x, t)
    planned = memory_plan(spec, shape, checkpoint_levels=switches.get("levels", ()),
                          checkpoint_mid=switches.get("mid", False), selective=switches.get("selective", True))
    assert measured == pytest.approx(planned.saved_bytes, rel=0.05)


@pytest.mark.parametrize("switches", [{}, {"levels": (1, 2), "mid": True, "conditions": True}],
                         ids=["selective", "checkpointed"])
def test_planned_saved_activations_of_a_conditioned_unet_with_3d_kernels_match_a_real_cpu_forward(switches):
    # 3x3x3 kernels at depth 8 and 4, dynamic-conv fusion, cross-attention and the condition encoder:
    # recipes, products and selective checkpoints all at once, against what malloc really holds.
    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to measure what a CPU forward holds")
    spec = UNetSpec.conditioned(text_channels=16, channels=(32, 32), attention_levels=(2,), num_groups=8,
                                head_channels=8, sample_size=(8, 64, 64), time_embedding_channels=32)
    shape = (1, 1, 8, 64, 64)
    torch.manual_seed(0)
    model = UNet3D(spec).set_gradient_checkpointing(**switches)
    conditions = {k: torch.randn(v.shape) for k, v in _conditions(spec, shape, torch.float32, 7).items()}
    x, t = torch.randn(shape), torch.tensor([3.0])
    model(x, t, **conditions).sum().backward()  # warm up (and let Conv3d measure its weight gradients)
    measured = held_for_backward(model, x, t, **conditions)
    planned = memory_plan(spec, shape, text_tokens=7, checkpoint_levels=switches.get("levels", ()),
                          checkpoint_mid=switches.get("mid", False),
                          checkpoint_conditions=switches.get("conditions", False))
    assert measured == pytest.approx(planned.saved_bytes, rel=0.05)


def _measured_and_planned_peaks(spec: UNetSpec, shape: tuple[int, ...], *, levels: tuple[int, ...],
                                conditions: bool) -> tuple[int, dict]:
    """The second training step with torch's default Adam (the first made its state) in this process:
    the most malloc handed out at once, plus what was allocated before (parameters, Adam state,
    inputs); and the plans of the same step for each device. Conditions have 7 text tokens."""
    from cpcbm_blocks.blocks.conv_weight_grad import set_weight_grad_method
    from cpcbm_blocks.measure import PeakMallocSampler

    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to measure what a CPU step allocates")
    torch.manual_seed(0)
    model = UNet3D(spec).set_gradient_checkpointing(levels=levels, mid=True, conditions=conditions)
    optimizer = torch.optim.Adam(model.parameters())  # on CPU, one parameter at a time, as planned
    inputs = {k: torch.randn(v.shape) for k, v in _conditions(spec, shape, torch.float32, 7).items()}
    x, t, target = torch.randn(shape), torch.tensor([3.0]), torch.randn(shape)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t, **inputs), target).backward()
        optimizer.step()

    set_weight_grad_method("aten")  # one form, no timing runs: the plan then plans the same
    try:
        step()
        optimizer.zero_grad(set_to_none=True)
        with PeakMallocSampler(interval_s=0.0002) as sampler:
            step()
        plans = {device: memory_plan(spec, shape, device=device, text_tokens=7, checkpoint_levels=levels,
                                     checkpoint_mid=True, checkpoint_conditions=conditions) for device in DEVICES}
    finally:
        set_weight_grad_method("auto")
    allocated_before = sum(v.numel() * v.element_size() for v in (
        *model.parameters(), *(s for state in optimizer.state.values() for s in state.values() if s.dim() > 0),
        x, target, *inputs.values()))
    return sampler.peak_bytes - sampler.start_bytes + allocated_before, plans


def test_the_planned_peak_of_a_cpu_training_step_matches_what_malloc_hands_out_within_5_percent():
    """A whole checkpointed step with Adam, 3x3x3 kernels, conditions, against the plan. The oneDNN
    copies are what bring the plan this close: the tensors live at the planned peak, without the
    copies on top of them, fall short by more."""
    spec = UNetSpec.conditioned(text_channels=16, channels=(32, 32), attention_levels=(2,), num_groups=8,
                                head_channels=8, sample_size=(8, 64, 64), time_embedding_channels=32)
    measured, plans = _measured_and_planned_peaks(spec, (1, 1, 8, 64, 64), levels=(1, 2), conditions=True)
    cpu = plans["cpu"]
    assert measured == pytest.approx(cpu.peak_bytes, rel=0.05)
    assert cpu.peak_scratch_bytes > 0
    assert abs(measured - cpu.peak_bytes) < measured - (cpu.peak_bytes - cpu.peak_scratch_bytes)


def test_planned_forward_flops_equal_flop_counter_mode_on_a_real_cpu_forward(tiny_spec):
    shape = (2, 1, 4, 8, 8)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOP_FORMULAS) as counter, shape_checks(False):
        UNet3D(tiny_spec)(torch.randn(shape), 5)
    planned = memory_plan(tiny_spec, shape, selective=False)
    assert planned.forward_flops == counter.get_total_flops() > 0
    assert planned.embedding_forward_flops + sum(s.forward_flops for s in planned.steps) == planned.forward_flops
    assert planned.backward_flops == pytest.approx(2 * planned.forward_flops, rel=0.1)
    # Selective recomputation runs this tiny spec's cheap 8-channel convolutions again in backward.
    selective = memory_plan(tiny_spec, shape)
    assert selective.forward_flops == planned.forward_flops and selective.backward_flops > planned.backward_flops


SMALL = (1, 1, 8, 32, 32)


@pytest.fixture(scope="module")
def default_plan():
    """The default spec's plan at a small size (on meta the cost is per operator, not per voxel)."""
    return memory_plan(UNetSpec.default(), SMALL)


def test_the_plan_grows_with_batch_and_input_size(default_plan):
    spec, small = UNetSpec.default(), default_plan
    for bigger in ((1, 1, 8, 64, 64), (1, 1, 16, 32, 32)):
        plan = memory_plan(spec, bigger)
        assert plan.saved_bytes > small.saved_bytes and plan.peak_bytes > small.peak_bytes
        assert plan.forward_flops > small.forward_flops and plan.parameter_count == small.parameter_count
    two = memory_plan(spec, (2, 1, 8, 32, 32))
    assert two.saved_bytes > small.saved_bytes and two.peak_bytes > small.peak_bytes
    assert two.forward_flops == 2 * small.forward_flops


def test_the_default_plan_counts_parameters_gradients_and_adam_state_from_the_real_model(default_plan):
    spec, plan = UNetSpec.default(), default_plan
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet3D(spec).parameters())
    assert plan.parameter_count == count == plan.embedding_parameters + sum(s.parameters for s in plan.steps)
    assert plan.gradient_bytes == plan.parameter_bytes == 4 * count
    assert plan.optimizer_bytes >= 2 * plan.parameter_bytes
    assert plan.peak_bytes > plan.parameter_bytes + plan.gradient_bytes + plan.optimizer_bytes + plan.saved_bytes / 2


def test_checkpointing_lowers_the_saved_bytes_and_adds_the_recomputation_to_backward(default_plan):
    spec, shape, plain = UNetSpec.default(), SMALL, default_plan
    checkpointed = memory_plan(spec, shape, checkpoint_levels=(1, 2, 3, 4), checkpoint_mid=True)
    # 3x fewer than plain PyTorch holds, and fewer than selective recomputation (the default) holds
    assert checkpointed.saved_bytes * 3 < memory_plan(spec, shape, selective=False).saved_bytes
    assert checkpointed.saved_bytes < plain.saved_bytes
    assert checkpointed.peak_bytes <= plain.peak_bytes  # equal where the Adam update is the peak
    assert checkpointed.forward_flops == plain.forward_flops
    # Backward runs the checkpointed forwards again, up to the last operator whose saved tensors it
    # needs (non-reentrant checkpointing stops early: a block's last convolution is not redone).
    assert plain.backward_flops + plain.forward_flops / 2 < checkpointed.backward_flops
    assert checkpointed.backward_flops < plain.backward_flops + plain.forward_flops
    assert all(s.checkpointed == (s.step.group != 0 or s.step.section.value == "mid") for s in checkpointed.steps)


def test_the_naive_backend_materialises_the_scores_and_the_fused_one_does_not(default_plan):
    spec, shape, fused = UNetSpec.default(), SMALL, default_plan
    naive = memory_plan(spec, shape, attention_backend="naive")
    assert fused.attention_score_bytes == 0
    for s in naive.steps:
        if s.step.op.value == "attn":
            channels, d, h, w = s.transition.in_shape
            heads, n = channels // spec.head_channels, d * h * w
            assert s.attention_score_bytes == 4 * heads * n * n  # one fp32 (heads, n, n) matrix per call
        else:
            assert s.attention_score_bytes == 0
    assert naive.forward_flops == fused.forward_flops
    # Kept for backward without recomputation; selective recomputation drops the scores again.
    plain_naive = memory_plan(spec, shape, attention_backend="naive", selective=False)
    plain_fused = memory_plan(spec, shape, selective=False)
    assert plain_naive.saved_bytes > plain_fused.saved_bytes
    assert naive.saved_bytes < plain_naive.saved_bytes


def test_the_score_figure_is_one_matrix_per_attention_call_and_is_not_read_as_part_of_the_saved_bytes():
    """The naive forward makes three score-shaped tensors in turn (q k^T, its scaling, the softmax); the
    figure is one of them, batch x heads x n x m x dtype size, and the largest over the steps in total."""
    spec, shape = UNetSpec.default(), (2, 1, 8, 64, 64)
    naive = memory_plan(spec, shape, attention_backend="naive", dtype="bf16")
    matrices = []
    for s in naive.steps:
        if s.step.op.value == "attn":
            channels, d, h, w = s.transition.in_shape
            matrices.append(2 * (channels // spec.head_channels) * (d * h * w) ** 2 * 2)  # batch 2, bf16
            assert s.attention_score_bytes == matrices[-1]
    assert naive.attention_score_bytes == max(matrices) == naive.to_dict()["attention_score_bytes"]
    text = naive.render()
    saved_line = next(line for line in text.splitlines() if line.startswith("saved for backward"))
    assert "attention" not in saved_line and "scores" not in saved_line
    assert f"attention score matrix, largest: {max(matrices) / 2**20:.1f} MiB (batch x heads x n x m" in text
    assert "attention score matrix: none materialised (sdpa backend)" in memory_plan(spec, shape).render()


@pytest.mark.parametrize("spec_name, switches", [
    ("default", {}), ("conditioned", {}),
    ("conditioned", {"checkpoint_levels": (1, 2, 3, 4), "checkpoint_mid": True, "checkpoint_conditions": True})],
    ids=["default", "conditioned", "conditioned-checkpointed"])
def test_the_totals_are_the_sums_of_the_rows_with_the_embedding_row(spec_name, switches):
    plan = memory_plan(getattr(UNetSpec, spec_name)(), SMALL, text_tokens=7, **switches)
    report = plan.to_dict()
    for total, embedding, row in (("parameter_count", "embedding_parameters", "parameters"),
                                  ("saved_bytes", "embedding_saved_bytes", "saved_bytes"),
                                  ("forward_flops", "embedding_forward_flops", "forward_flops"),
                                  ("backward_flops", "embedding_backward_flops", "backward_flops")):
        assert report[embedding] > 0, embedding
        assert report[total] == report[embedding] + sum(step[row] for step in report["steps"]), total
    first_row = plan.render().splitlines()[1]
    assert first_row.split()[0] == "0" and plan.embedding_name in first_row
    assert f"{plan.embedding_parameters:,}" in first_row and f"{plan.embedding_saved_bytes / 2**20:.1f}" in first_row


def test_bf16_halves_the_activations(default_plan):
    fp32, bf16 = default_plan, memory_plan(UNetSpec.default(), SMALL, dtype="bf16")
    assert bf16.saved_bytes == pytest.approx(fp32.saved_bytes / 2, rel=0.02)
    assert bf16.parameter_bytes * 2 == fp32.parameter_bytes


def test_the_largest_batch_fits_and_one_more_does_not(tiny_spec):
    plan = memory_plan(tiny_spec, (1, 1, 4, 8, 8))
    budget = plan.with_batch(3).peak_bytes + 1
    assert plan.largest_batch(budget) == 3
    assert plan.with_batch(4).peak_bytes > budget
    assert plan.largest_batch(plan.parameter_bytes) == 0
    answer = plan.largest_batch(2.0**30)  # a budget in floating point, as `24 * 2.0**30`, still gives an int
    assert type(answer) is int and plan.with_batch(answer).peak_bytes <= 2**30 < plan.with_batch(answer + 1).peak_bytes


@pytest.mark.parametrize("budget", [0, -2.0**30, float("nan"), float("inf"), True, "24 GiB"])
def test_the_largest_batch_refuses_a_budget_that_is_not_a_positive_finite_number(tiny_spec, budget):
    plan = memory_plan(tiny_spec, (1, 1, 4, 8, 8))
    with pytest.raises(InputError, match=r"largest_batch\(budget_bytes=\.\.\.\): expected a (finite number|number > 0), got .*largest_batch\(24"):
        plan.largest_batch(budget)


def test_the_largest_batch_docs_name_the_device_and_what_is_not_counted(tiny_spec):
    doc = MemoryPlan.largest_batch.__doc__
    assert "`device`" in doc and "Python/torch process" in doc and "C allocator" in doc
    assert "CUDA context" in doc and "caching allocator" in doc
    cpu, cuda = (memory_plan(tiny_spec, (1, 1, 4, 8, 8), device=device) for device in ("cpu", "cuda"))
    assert "Python/torch process" in cpu.not_counted and "C allocator" in cpu.not_counted
    assert "CUDA context" in cuda.not_counted and "caching allocator" in cuda.not_counted


@pytest.mark.parametrize("growth", ["linear", "convex", "concave"])
def test_the_batch_search_is_exact_when_memory_does_not_grow_linearly(tiny_spec, monkeypatch, growth):
    """The search guesses from batches 1 and 2; whatever the curve, its answer is the true boundary."""
    plan = memory_plan(tiny_spec, (1, 1, 4, 8, 8))
    extra = {"linear": lambda b: 1000 * b, "convex": lambda b: 1000 * b + 300 * b * b,
             "concave": lambda b: 1000 * b - 40 * b * b if b < 12 else 1000 * b - 40 * 144}[growth]

    def peak(batch: int) -> int:
        return plan.peak_bytes + extra(batch) - extra(1)

    planned: list[int] = []

    def with_batch(self, batch):
        planned.append(batch)
        return types.SimpleNamespace(peak_bytes=peak(batch))

    monkeypatch.setattr(MemoryPlan, "with_batch", with_batch)
    for answer in (1, 2, 3, 7, 20, 61):
        for budget in (peak(answer), peak(answer + 1) - 1):
            planned.clear()
            assert plan.largest_batch(budget) == answer, (growth, answer, budget)
            if growth == "linear":  # the guess is right: batch 2, the guess and one more
                assert len(planned) <= 3, planned
            else:  # doubling steps from the guess, then bisection
                assert len(planned) <= 30, planned


def test_the_dominant_level_of_the_default_is_the_full_resolution_one(default_plan):
    assert default_plan.dominant_level() == "level 1"
    assert "dominant level: level 1" in default_plan.render()


@pytest.mark.parametrize("device", DEVICES)
def test_the_plan_says_where_its_peak_is_reached(device):
    # Checkpointed and conditioned at full size: the peak is in the backward of a full-resolution block (the
    # first decoder block's or, with level 1's first skip remade, the encoder's fusion, where the skip is
    # remade), at a convolution's backward, where oneDNN's blocked copies of its operands (CPU) or cuDNN's
    # workspace (CUDA) add to it.
    plan = memory_plan(UNetSpec.conditioned(), (1, 1, 8, 256, 256), device=device, checkpoint_levels=(1, 2, 3, 4),
                       checkpoint_mid=True, checkpoint_conditions=True)
    step = plan.steps[plan.peak_step].step
    assert plan.peak_phase == "backward" and step.group == 1 and step.section in (Section.DOWN, Section.UP)
    assert plan.peak_operator.startswith("convolution_backward") and plan.peak_scratch_bytes >= 64 * 2**20
    assert ("oneDNN's blocked copies" if device == "cpu" else "cuDNN's workspace") in plan.peak_at
    assert f"of step {plan.peak_step + 1} ({step.describe()})" in plan.peak_at
    assert f"peak reached      {plan.peak_at}" in plan.render() and plan.to_dict()["peak_at"] == plan.peak_at


@pytest.mark.parametrize("device", DEVICES)
def test_adams_update_is_planned_as_torch_runs_it_on_the_device(device):
    # At 32x32, checkpointed, the default's activations are small beside three copies of its
    # parameters (the gradients and Adam's moments), so the update is the peak on both devices. Its
    # temporaries differ: CUDA's multi-tensor Adam makes them for all parameters at once, CPU's
    # default updates one parameter at a time (the largest one's, twice: the square root and the step).
    spec = UNetSpec.default()
    plan = memory_plan(spec, (1, 1, 8, 32, 32), device=device, checkpoint_levels=(1, 2, 3, 4), checkpoint_mid=True)
    assert plan.peak_phase == "optimizer" and plan.peak_step is None and plan.peak_scratch_bytes == 0
    assert plan.peak_at == "in Adam's update"
    temporaries = plan.peak_bytes - (plan.parameter_bytes + plan.gradient_bytes + plan.optimizer_bytes
                                     + plan.input_bytes)
    largest = max(p.numel() * p.element_size() for p in UNet3D(spec).parameters())
    if device == "cuda":
        assert temporaries >= plan.parameter_bytes
    else:
        assert largest <= temporaries <= 2.01 * largest


def test_a_small_cpu_step_with_torchs_default_adam_matches_malloc_within_5_percent():
    """At 32x32, checkpointed, the parameters, their gradients and Adam's moments are nearly all of
    the peak, so how the update is planned decides it. CPU's default Adam against the plan; the
    form CUDA runs (planned with `device="cuda"`) would put the peak a parameter-sized copy higher."""
    measured, plans = _measured_and_planned_peaks(UNetSpec.default(), (1, 1, 8, 32, 32), levels=(1, 2, 3, 4),
                                                  conditions=False)
    assert measured == pytest.approx(plans["cpu"].peak_bytes, rel=0.05)
    assert plans["cuda"].peak_bytes > 1.1 * measured


def test_bad_arguments_are_rejected_with_what_to_do():
    with pytest.raises(InputError, match="dtype: expected one of"):
        memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), dtype="fp8")
    with pytest.raises(InputError, match=r"memory_plan\(checkpoint_levels=\.\.\.\): expected a tuple of 1-based level "
                                         r"numbers in 1\.\.4, got \(5,\)"):
        memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), checkpoint_levels=(5,))
    with pytest.raises(InputError, match="x: expected width to be a multiple of 16"):
        memory_plan(UNetSpec.default(), (1, 1, 8, 64, 60))
    with pytest.raises(InputError, match=r"checkpoint_levels=\.\.\.\): expected a tuple .* got 1\. .*pass a tuple such as "
                                         r"\(4,\), or range\(1, 5\) for all of them"):
        memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), checkpoint_levels=1)
    with pytest.raises(InputError, match=r"memory_plan\(checkpoint_mid=\.\.\.\): expected True or False, got 'no'"):
        memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), checkpoint_mid="no")
    with pytest.raises(InputError, match="attention_backend: expected one of 'sdpa', 'naive', got 'flash'"):
        memory_plan(UNetSpec.default(), (1, 1, 8, 64, 64), attention_backend="flash")
    with pytest.raises(InputError, match=r"memory_plan\(text_tokens=\.\.\.\): expected an int >= 1, got -5\. Pass e\.g\. text_tokens=77"):
        memory_plan(UNetSpec.conditioned(), (1, 1, 8, 64, 64), text_tokens=-5)


def test_a_plan_made_where_no_weight_gradient_was_timed_says_it_assumed_the_larger_form(tiny_spec, monkeypatch):
    """On meta, `"auto"` cannot time the weight-gradient forms: a problem not timed in this process is
    planned in the depth-tap form. The plan says so, and says it once this process has timed some."""
    from cpcbm_blocks.blocks import conv_weight_grad

    monkeypatch.setattr(conv_weight_grad, "_weight_grad_method", "auto")
    monkeypatch.setattr(conv_weight_grad, "_fastest_form", {})  # as in a fresh process
    shape = (1, 1, 4, 8, 8)
    fresh = memory_plan(tiny_spec, shape)
    assert fresh.weight_grad_method == "auto" and fresh.weight_grad_problems_timed == 0
    line = next(line for line in fresh.render().splitlines() if line.startswith("weight gradients"))
    assert "none timed in this process yet" in line and "depth-tap form" in line and "upper bound" in line
    torch.manual_seed(0)
    UNet3D(tiny_spec)(torch.randn(shape), torch.tensor([3.0])).sum().backward()  # "auto" times each problem
    timed = memory_plan(tiny_spec, shape)
    assert timed.weight_grad_problems_timed == len(conv_weight_grad._fastest_form) > 0
    assert (f"the form timed fastest where this process has timed the problem ({timed.weight_grad_problems_timed} "
            "timed so far") in timed.render()
    monkeypatch.setattr(conv_weight_grad, "_weight_grad_method", "aten")
    assert "the 'aten' form throughout, pinned by set_weight_grad_method" in memory_plan(tiny_spec, shape).render()
    assert "do not apply" in memory_plan(tiny_spec, shape, device="cuda").weight_grad_assumption


def test_the_untimed_assumption_is_the_upper_bound_of_the_two_forms(monkeypatch):
    """Where a weight gradient sets the peak (checkpointed, 128x128), the depth taps assumed for untimed
    problems plan a higher peak than oneDNN's 3-D form."""
    from cpcbm_blocks.blocks import conv_weight_grad

    monkeypatch.setattr(conv_weight_grad, "_fastest_form", {})
    peaks = {}
    for method in ("auto", "aten"):
        monkeypatch.setattr(conv_weight_grad, "_weight_grad_method", method)
        plan = memory_plan(UNetSpec.default(), (1, 1, 8, 128, 128), checkpoint_levels=(1, 2, 3, 4), checkpoint_mid=True)
        peaks[method] = plan.peak_bytes
    assert peaks["auto"] > peaks["aten"]  # the taps' slice copies: strictly more here


def test_the_dtype_is_documented_as_a_cast_model_and_autocast_as_fp32_state():
    doc = memory_plan.__doc__
    assert "model.to(dtype)" in doc and "torch.autocast" in doc and "stay float32" in doc
    assert "depth-tap form" in doc and "upper bound" in doc


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_planned_peak_matches_cuda_max_memory_allocated_within_10_percent():
    spec, shape = UNetSpec.default(), (1, 1, 8, 128, 128)
    device = torch.device("cuda")
    # cuBLAS's workspaces (two of 32 MiB on an H200) come with the process's first matrix product and stay:
    # the plan leaves them out, as it does the CUDA context, so they exist before `before` is read.
    ones = {"device": device, "requires_grad": True}  # a product with a bias too: cuBLASLt's workspace
    torch.nn.functional.linear(torch.ones(2, 8, **ones), torch.ones(4, 8, **ones), torch.ones(4, **ones)).sum().backward()
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # cuBLAS's workspaces and what earlier tests left: not this step's
    model = UNet3D(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), foreach=True)
    x, t, target = torch.randn(shape, device=device), torch.tensor([3.0], device=device), torch.randn(shape, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t), target).backward()
        optimizer.step()

    with shape_checks(False), attention_backend("sdpa"):
        step()  # the Adam state exists from here on, as in the plan's steady state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak == pytest.approx(memory_plan(spec, shape, device="cuda").peak_bytes, rel=0.10)


def test_the_cudnn_workspace_model_gives_what_an_h200_allocated_for_the_full_size_convolutions():
    # Workspace sizes read off the caching allocator's history of a real float32 step (TF32 on, torch
    # 2.11, cuDNN, H200; `benchmarks/bench_gpu_step.py --snapshot`): NDHWC copies of the operands.
    aten, meta = torch.ops.aten, {"device": "meta"}
    x, w = torch.empty(1, 32, 8, 256, 256, **meta), torch.empty(32, 32, 3, 3, 3, **meta)  # level 1, 32 -> 32
    forward = cudnn_workspace_bytes(aten.convolution.default, (x, w, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1),
                                    torch.empty_like(x))
    assert forward == pytest.approx(128.1056 * 2**20, rel=1e-4)  # measured 128.1056 MiB

    def backward(mask):
        out = tuple(torch.empty_like(t) if m else None for t, m in zip((x, w, w[:, 0, 0, 0]), mask, strict=True))
        return cudnn_workspace_bytes(aten.convolution_backward.default,
                                     (x, x, w, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, mask), out)

    assert backward([True, False, False]) == pytest.approx(128.11 * 2**20, rel=1e-3)  # measured 128.11 MiB
    assert backward([False, True, False]) == pytest.approx(132.92 * 2**20, rel=0.04)  # 132.92: 4.8 MiB more
    assert backward([True, True, True]) == max(backward([True, False, False]), backward([False, True, False]))
    # A depth-1 level's (1, 3, 3) convolution runs as a 2-D one: (1, 256, 32, 32) in and out.
    planar, w2 = torch.empty(1, 256, 32, 32, **meta), torch.empty(256, 256, 3, 3, **meta)
    assert cudnn_workspace_bytes(aten.convolution.default, (planar, w2, None, [1] * 2, [1] * 2, [1] * 2, False, [0] * 2, 1),
                                 torch.empty_like(planar)) == pytest.approx(4.2500 * 2**20, rel=1e-4)  # measured
    # Channels-last operands need no copy; other operators have no workspace.
    last = x.contiguous(memory_format=torch.channels_last_3d)
    assert cudnn_workspace_bytes(aten.convolution.default, (last, w.contiguous(memory_format=torch.channels_last_3d),
                                 None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1), last) == 0
    assert cudnn_workspace_bytes(aten.add.Tensor, (x, x), x) == 0


def test_a_cuda_plan_adds_cudnns_workspace_to_the_peak_and_trains_without_selective_recomputation(tiny_spec):
    shape = (1, 1, 8, 32, 32)
    cuda = memory_plan(tiny_spec, shape, device="cuda")
    assert not cuda.selective and memory_plan(tiny_spec, shape).selective  # decided by device, as UNet3D does
    assert cuda.peak_bytes == memory_plan(tiny_spec, shape, device="cuda", selective=False).peak_bytes
    assert memory_plan(tiny_spec, shape, device="cuda", selective=True).saved_bytes < cuda.saved_bytes
    assert cuda.peak_scratch_bytes > 0 and "cuDNN's workspace" in cuda.peak_at


def _saved_bytes_of_a_step(model, x, t) -> int:
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t)
    return sum(saved)


def test_selective_recomputation_is_on_by_default_on_the_cpu_and_off_for_a_gpu_step(tiny_spec):
    from cpcbm_blocks.blocks.conv_onednn import meta_stands_for
    from cpcbm_blocks.recompute import selective_by_default

    x, t = torch.randn(1, 1, 8, 32, 32), torch.tensor([3.0])
    assert selective_by_default(x)
    model = UNet3D(tiny_spec)
    held = {switch: _saved_bytes_of_a_step(model.set_gradient_checkpointing(selective=switch), x, t)
            for switch in (None, True, False)}
    assert held[None] == held[True] < held[False]
    meta_x = x.to("meta")
    with meta_stands_for("cuda"):  # the device a GPU step is planned on: the GPU's default
        assert not selective_by_default(meta_x)
        model = model.to("meta")
        held = {switch: _saved_bytes_of_a_step(model.set_gradient_checkpointing(selective=switch), meta_x,
                                               t.to("meta"))
                for switch in (None, True, False)}
    assert held[None] == held[False] > held[True]


def test_a_conditioned_spec_is_planned_with_its_conditions_and_its_encoder_can_be_checkpointed():
    spec = UNetSpec.conditioned()
    plain = memory_plan(spec, SMALL, selective=False)
    selective = memory_plan(spec, SMALL)
    checkpointed = memory_plan(spec, SMALL, checkpoint_conditions=True)
    assert plain.input_bytes > memory_plan(UNetSpec.default(), SMALL).input_bytes  # text and images are inputs
    assert plain.embedding_parameters > 0 and plain.embedding_saved_bytes > 0
    assert checkpointed.embedding_saved_bytes < selective.embedding_saved_bytes < plain.embedding_saved_bytes
    assert checkpointed.embedding_saved_bytes < plain.embedding_saved_bytes / 3
    assert checkpointed.forward_flops == plain.forward_flops and checkpointed.backward_flops > plain.backward_flops


def test_the_peak_malloc_sampler_sees_a_transient_tensor():
    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    from cpcbm_blocks.measure import PeakMallocSampler
    size = 64 * 2**20
    with PeakMallocSampler() as sampler:
        transient = torch.ones(size // 4)
        time.sleep(0.02)
        del transient
    assert sampler.peak_bytes - sampler.start_bytes >= size
    assert malloc_bytes_in_use() < sampler.start_bytes + size // 2  # it was freed again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shape_only_kernels_match_the_meta_decompositions(dtype, channels_last):
    from cpcbm_blocks.memory import _SHAPE_ONLY

    def same(ours, theirs):
        for a, b in zip(tree_leaves(ours), tree_leaves(theirs), strict=True):
            assert (a.shape, a.dtype, a.stride(), a.device) == (b.shape, b.dtype, b.stride(), b.device)

    aten = torch.ops.aten
    x = torch.empty(2, 8, 3, 5, 6, device="meta", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    weight, bias = torch.empty(8, device="meta", dtype=dtype), torch.empty(8, device="meta", dtype=dtype)
    forward_args = (x, weight, bias, 2, 8, 90, 4, 1e-5)
    out, mean, rstd = aten.native_group_norm(*forward_args)
    same(_SHAPE_ONLY[aten.native_group_norm](*forward_args), (out, mean, rstd))
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        backward_args = (torch.empty_like(out), x, mean, rstd, weight, 2, 8, 90, 4, mask)
        theirs = aten.native_group_norm_backward(*backward_args)
        ours = _SHAPE_ONLY[aten.native_group_norm_backward](*backward_args)
        assert [t is None for t in ours] == [t is None for t in theirs]
        same([t for t in ours if t is not None], [t for t in theirs if t is not None])
    tensors = [torch.empty(3, 4, device="meta", dtype=dtype), x]
    others = [torch.empty_like(t) for t in tensors]
    for packet, kernel in _SHAPE_ONLY.items():
        name = packet.__name__
        if not name.startswith("_foreach"):
            continue
        args = {"addcdiv": (others, others, 0.5), "addcmul": (others, others, 0.5), "lerp_": (others, 0.9),
                "copy_": (others,), "add": (others,), "sub": (others,), "mul": (others,), "div": (others,),
                "maximum_": (others,)}
        extra = args.get(name.removeprefix("_foreach_"), args.get(name.removeprefix("_foreach_").rstrip("_"), ()))
        if name.endswith("_"):
            copies = [torch.empty_like(t) for t in tensors]
            assert packet(copies, *extra) is None and kernel(copies, *extra) is None
        else:
            same(kernel(tensors, *extra), packet(tensors, *extra))


@pytest.mark.skipif(peak_rss_bytes() is None, reason="needs Linux /proc")
def test_a_child_process_peak_rss_is_its_own_not_its_parents():
    """`ru_maxrss` survives `execve` and there takes the parent's high-water mark (subprocess vforks);
    `peak_rss_bytes` reads the child's own. Checked by a parent that touched 768 MiB first."""
    touched = bytearray(768 * 2**20)
    touched[::4096] = b"\x01" * len(range(0, len(touched), 4096))
    del touched
    assert peak_rss_bytes() > 768 * 2**20
    report = ("import resource; from cpcbm_blocks.measure import peak_rss_bytes; "
              "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    child = subprocess.run([sys.executable, "-c", report], capture_output=True, text=True, check=True)
    own, maxrss = map(int, child.stdout.split())
    assert maxrss > 768 * 2**20  # the trap: the parent's mark
    assert own < 400 * 2**20  # Python, torch and this package alone


_CONVOLUTION_PROBLEMS = {  # (input shape, output channels, kernel, layout)
    "32->32": ((1, 32, 8, 192, 192), 32, 3, "plain"), "64->32": ((1, 64, 8, 192, 192), 32, 3, "plain"),
    "32->64 pointwise": ((1, 32, 8, 192, 192), 64, 1, "plain"), "32->1 (head)": ((1, 32, 8, 192, 192), 1, 3, "plain"),
    "24->32": ((1, 24, 8, 192, 192), 32, 3, "plain"), "32->32 depth last": ((1, 32, 8, 192, 192), 32, 3, "depth last"),
    "32->32 channels last": ((1, 32, 8, 192, 192), 32, 3, "channels last"),
    "4->32 on slow_conv3d": ((1, 4, 8, 96, 96), 32, 3, "plain"),
    "32->32 oneDNN as is": ((1, 32, 8, 64, 512), 32, 3, "oneDNN as is"),  # N*C*D*H <= 20480: conv3d's own call
    "32->64 pointwise oneDNN as is": ((1, 32, 8, 64, 512), 64, 1, "oneDNN as is"),
}


@pytest.mark.parametrize("problem", _CONVOLUTION_PROBLEMS)
def test_the_onednn_scratch_model_matches_what_malloc_hands_out_around_a_real_convolution(problem):
    """What a CPU convolution, its input gradient and its weight gradient allocate beyond their results
    (the most malloc handed out during the call), against `onednn_scratch_bytes` for the same call."""
    from cpcbm_blocks.measure import PeakMallocSampler

    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc's mallinfo2")
    shape, out_channels, k, layout = _CONVOLUTION_PROBLEMS[problem]
    x, weight = torch.randn(shape), torch.randn(out_channels, shape[1], k, k, k)
    padding = [k // 2] * 3
    if layout == "depth last":  # as conv3d runs a shallow volume: a permuted view of x
        x, weight = x.permute(0, 1, 3, 4, 2), weight.permute(0, 1, 3, 4, 2)
    if layout == "channels last":
        x, weight = x.to(memory_format=torch.channels_last_3d), weight.to(memory_format=torch.channels_last_3d)
    grad_out = torch.randn_like(torch.nn.functional.conv3d(x, weight, padding=padding))
    if layout == "depth last":
        grad_out = grad_out.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
    calls = {"forward": (torch.ops.aten.convolution.default,
                         (x, weight, None, [1] * 3, padding, [1] * 3, False, [0] * 3, 1))}
    for name, mask in (("input gradient", [True, False, False]), ("weight gradient", [False, True, False])):
        calls[name] = (torch.ops.aten.convolution_backward.default,
                       (grad_out, x, weight, None, [1] * 3, padding, [1] * 3, False, [0] * 3, 1, mask))
    if layout == "oneDNN as is":  # forward and input gradient as `_OneDnnConv3d` calls them
        flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
        calls = {"forward": (torch.ops.aten.mkldnn_convolution.default, (x, weight, None, padding, [1] * 3, [1] * 3, 1)),
                 "input gradient": (torch.ops.aten.mkldnn_convolution.default,
                                    (grad_out, flipped, None, padding, [1] * 3, [1] * 3, 1))}
    pointwise = k == 1
    for threads in (1, 2) if pointwise else (2,):  # one thread leaves pointwise kernels to PyTorch's own code
        torch.set_num_threads(threads)
        try:
            for name, (func, args) in calls.items():
                func(*args)  # oneDNN builds its kernels on the first call
                measured = 0
                for _ in range(3):  # a polling sampler can miss a short transient, never invent one: keep the most
                    with PeakMallocSampler(interval_s=0.0002) as sampler:
                        out = func(*args)
                    results = sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
                    measured = max(measured, sampler.peak_bytes - sampler.start_bytes - results)
                    predicted = onednn_scratch_bytes(func, args, out)
                    if measured == pytest.approx(predicted, rel=0.10, abs=2**20):
                        break
                where = f"{problem}, {name}, {threads} threads"
                assert measured == pytest.approx(predicted, rel=0.10, abs=2**20), where
        finally:
            torch.set_num_threads(1)


def test_held_for_backward_is_what_the_graph_holds_whatever_the_output_looks_like():
    if malloc_bytes_in_use() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    weight, x = torch.randn(1024, 1024, requires_grad=True), torch.randn(256, 1024)

    def views_of_one_output(x):
        y = (x @ weight).sin()  # sin saves the product (1 MiB); the matmul saves x and weight, held elsewhere
        return y, y[:10], {"again": y}

    assert held_for_backward(views_of_one_output, x) == pytest.approx(2**20, rel=0.02)
    assert abs(held_for_backward(lambda x: x @ weight, x)) < 2**15  # the matmul holds nothing new
