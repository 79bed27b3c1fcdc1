"""The memory and speed switches change time and memory, never the function."""

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from cpcbm_blocks import InputError, UNet3D, attention_backend, set_attention_backend, shape_checks
from cpcbm_blocks.blocks.attention import AttentionBackend, attention, reference_attention
from cpcbm_blocks.blocks.conv import memory_format_of

from .conftest import randomize_


def _model(spec, seed=0):
    torch.manual_seed(seed)
    return randomize_(UNet3D(spec), scale=0.1, seed=seed)


def _grads(model, x, t):
    model.zero_grad(set_to_none=True)
    out = model(x, t)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("levels", "mid"), [((1,), False), ((2,), True), ((1, 2), True)])
def test_gradient_checkpointing_gives_the_plain_models_outputs_and_gradients(tiny_spec, levels, mid):
    model = _model(tiny_spec)
    x, t = torch.randn(2, 1, 4, 8, 8), torch.tensor([3.0, 700.0])
    out, grads = _grads(model, x, t)
    model.set_gradient_checkpointing(levels=levels, mid=mid)
    assert model.gradient_checkpointing == (levels, mid)
    out_ckpt, grads_ckpt = _grads(model, x, t)
    torch.testing.assert_close(out_ckpt, out)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_checkpointed_steps_really_recompute_in_backward(tiny_spec):
    model = _model(tiny_spec).set_gradient_checkpointing(levels=(1, 2))
    calls = {name: [] for name in ("conv_in", "down1_res1", "down1_res1.conv1", "down1_res1.conv2", "down1_down.conv",
                                   "down2_attn1", "up1_up")}
    for name, log in calls.items():
        model.blocks.get_submodule(name).register_forward_pre_hook(lambda *_, log=log: log.append(1))
    model(torch.randn(1, 1, 4, 8, 8), 5).sum().backward()
    # A checkpointed residual block keeps only its inputs (rematerialized_saves(products=True)): in
    # backward its first convolution runs once more for its own saved tensors, its second not at all,
    # because no backward needs its output. The downsampler's output is not a skip, and the upsampler's
    # is cheap to make, so the next step saves them as their recipes and remakes them once in its
    # backward. Level 1's first skip (the first block's output) is remade too, once the decoder block
    # that reads it has run its backward: one more forward of that block, both its convolutions. The
    # stem's output it is remade from is a cheap recipe, run again at each use (for the chain, and for
    # each of the first block's saved tensors made from it) rather than kept. Attention runs again as a
    # whole (torch.utils.checkpoint).
    assert {name: len(log) for name, log in calls.items()} == {
        "conv_in": 6, "down1_res1": 2, "down1_res1.conv1": 3, "down1_res1.conv2": 2, "down1_down.conv": 2,
        "down2_attn1": 2, "up1_up": 2}
    with torch.no_grad():
        model(torch.randn(1, 1, 4, 8, 8), 5)
    assert len(calls["down1_res1.conv1"]) == 4 and len(calls["down2_attn1"]) == 3  # no recompute without grad
    assert len(calls["conv_in"]) == 7 and len(calls["down1_down.conv"]) == 3


def test_checkpointing_rejects_levels_that_do_not_exist(tiny_spec):
    with pytest.raises(InputError, match=r"set_gradient_checkpointing\(levels=\.\.\.\): expected a tuple of 1-based "
                                         r"level numbers in 1\.\.2, got \(3,\)"):
        UNet3D(tiny_spec).set_gradient_checkpointing(levels=(3,))
    with pytest.raises(InputError, match=r"got \(0, 1\)"):  # a generator is shown as the numbers it gave
        UNet3D(tiny_spec).set_gradient_checkpointing(levels=(n for n in (0, 1)))
    with pytest.raises(InputError, match=r"set_gradient_checkpointing\(mid=\.\.\.\): expected True or False"):
        UNet3D(tiny_spec).set_gradient_checkpointing(mid="yes")


def test_checkpointing_takes_levels_as_any_iterable_of_ints(tiny_spec):
    model = UNet3D(tiny_spec)
    for levels in ((2, 1), [1, 2], {1, 2}, range(1, 3), (n for n in (1, 2, 2))):
        assert model.set_gradient_checkpointing(levels=levels).gradient_checkpointing == ((1, 2), False)


def test_a_channels_last_model_and_input_give_the_same_outputs_and_gradients(tiny_spec):
    # A one-channel input made channels-last has NCDHW's strides, so two input channels here, and the
    # model itself channels-last (`model.to(memory_format=...)`, as PyTorch's tuning guides suggest).
    model = _model(dataclasses.replace(tiny_spec, in_channels=2))
    x, t = torch.randn(2, 2, 4, 8, 8), torch.tensor([3.0, 700.0])
    out, grads = _grads(model, x, t)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    assert not x_cl.is_contiguous()
    seen = []
    channels_last.blocks.get_submodule("down1_res1.conv1").register_forward_pre_hook(
        lambda module, args: seen.append(memory_format_of(args[0]) is torch.channels_last_3d))
    out_cl, grads_cl = _grads(channels_last, x_cl, t)
    assert seen == [True]  # the activations stay channels-last inside
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_cl[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_forward_and_backward_stay_finite(tiny_spec):
    model = _model(tiny_spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 4, 8, 8), torch.tensor([3.0, 700.0]))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_the_unet_gives_the_same_result_with_the_fused_and_the_naive_attention(tiny_spec):
    model = _model(tiny_spec)
    x = torch.randn(2, 1, 4, 8, 8)
    with attention_backend("sdpa"):
        fused, fused_grads = _grads(model, x, 5)
    with attention_backend("naive"):
        naive, naive_grads = _grads(model, x, 5)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], naive_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_sdpa_backend_calls_torchs_fused_attention_and_the_naive_one_does_not(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    q = torch.randn(1, 2, 5, 4)
    attention(q, q, q)
    assert calls == [1]
    with attention_backend(AttentionBackend.NAIVE):
        torch.testing.assert_close(attention(q, q, q), reference_attention(q, q, q))
    assert calls == [1]


def test_the_meta_device_plans_the_fused_kernel_which_keeps_no_scores():
    q = torch.empty(1, 2, 64, 4, device="meta", requires_grad=True)
    out = attention(q, q, q)
    assert out.shape == q.shape and "Flash" in type(out.grad_fn).__name__


def test_an_unknown_attention_backend_is_rejected():
    with pytest.raises(InputError, match="backend: expected one of 'sdpa', 'naive'"):
        set_attention_backend("flash")


def test_compile_fullgraph_has_no_graph_breaks_and_matches_eager(tiny_spec):
    torch._dynamo.reset()
    model = _model(tiny_spec).eval()
    x, t = torch.randn(1, 1, 4, 8, 8), torch.tensor([3.0])
    with shape_checks(False), torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, t)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, t), model(x, t))
    torch._dynamo.reset()


def _small_conditioned(**levels):
    """Two levels with attention at the second (the default), or e.g. three whose level 2 has neither
    attention nor cross-attention, so that its whole decoder trains in one rematerialized span."""
    from cpcbm_blocks import UNetSpec
    levels = {"channels": (8, 16), "attention_levels": (2,), **levels}
    spec = UNetSpec.conditioned(text_channels=8, num_groups=4, head_channels=4, sample_size=(4, 8, 8),
                                time_embedding_channels=16, **levels)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 8, 8, generator=generator)
    conditions = {"text": torch.randn(2, 5, 8, generator=generator),
                  "cond_images": torch.randn(2, spec.conditioning.image_channels, 4, 8, 8, generator=generator)}
    return spec, x, conditions


_THREE_LEVELS = {"channels": (8, 16, 32), "attention_levels": (3,), "dynamic_conv_levels": (1, 2),
                 "cross_attention_levels": (3,)}


@pytest.mark.parametrize("levels", [{}, _THREE_LEVELS], ids=["2", "3"])
def test_checkpointing_a_conditioned_unet_with_its_encoder_gives_the_same_gradients(levels):
    spec, x, conditions = _small_conditioned(**levels)
    model = _model(spec)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(x, torch.tensor([3.0, 700.0]), **conditions)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, plain = grads()
    model.set_gradient_checkpointing(levels=tuple(range(1, len(spec.levels) + 1)), mid=True, conditions=True)
    out_ckpt, checkpointed = grads()
    torch.testing.assert_close(out_ckpt, out)
    assert checkpointed.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def _followed(step) -> bool:
    """The steps whose outputs the test below follows: the encoder's, the upsamplers', level 2's decoder's."""
    return step.section.value == "down" or step.op.value == "up" or (step.section.value == "up" and step.group == 2)


def test_checkpointing_holds_skips_but_not_outputs_that_are_only_the_next_steps_input():
    """The stem's, the pre-fusion block's, the downsamplers' and the upsamplers' outputs are only the
    next step's input: under checkpointing that step saves them as recipes, so nothing holds them
    after the forward. So are level 2's decoder outputs but its last (the top upsampler's input),
    remade as one chain by that last step's backward. Skips stay held while the decoder reads them;
    level 1's skips but its last are remade once the decoder block that reads them has run its
    backward, which comes before that of the level's first decoder block (where the peak is)."""
    spec, x, conditions = _small_conditioned(**_THREE_LEVELS)
    model = _model(spec).set_gradient_checkpointing(levels=(1, 2, 3), mid=True, conditions=True)
    remade = {model.steps[p].module_key for p in model._remade_outputs}
    level_2_decoder = [step.module_key for step in model.steps if step.section.value == "up" and step.group == 2]
    assert len(level_2_decoder) >= 3
    assert {"conv_in", "down1_res1", "down1_res2", "down1_down", "up1_up", *level_2_decoder[:-1]} <= remade
    assert level_2_decoder[-1] not in remade
    level_1_skips = [p for p, step in enumerate(model.steps)
                     if step.section.value == "down" and step.group == 1 and step.gives_skip]
    assert len(level_1_skips) == 2
    assert {p for p in model._remade_outputs if model.steps[p].gives_skip} == set(level_1_skips[:-1])
    alive: dict[str, list[bool]] = {}
    handles = []
    for position, step in enumerate(model.steps):
        if not _followed(step):
            continue

        def record(module, args, out, key=f"{position}:{step.module_key}"):
            flag = [True]
            weakref.finalize(out.untyped_storage(), flag.__setitem__, 0, False)
            alive[key] = flag
        handles.append(model.blocks[step.module_key].register_forward_hook(record))
    # The gradient of level 1's first decoder block's output is made by the backward of the block after
    # it, which reads the level's first skip; when it arrives, that skip should be gone.
    first_decoder_block = next(p for p, step in enumerate(model.steps)
                               if step.section.value == "up" and step.group == 1 and step.takes_skip)
    first_skip = f"{level_1_skips[0]}:{model.steps[level_1_skips[0]].module_key}"
    first_skip_alive_then = []

    def at_first_decoder_block(module, args, out):
        if torch.is_grad_enabled() and out.requires_grad and not first_skip_alive_then:
            out.register_hook(lambda grad: first_skip_alive_then.append(alive[first_skip][0]))
    handles.append(model.blocks[model.steps[first_decoder_block].module_key].register_forward_hook(
        at_first_decoder_block))
    out = model(x, torch.tensor([3.0, 700.0]), **conditions)
    gc.collect()
    for position, step in enumerate(model.steps):
        if _followed(step):
            held = alive[f"{position}:{step.module_key}"][0]
            expected = position not in model._remade_outputs or step.gives_skip  # a skip: the decoder reads it
            assert held == expected, (position, step.module_key, held)
    out.square().mean().backward()  # the remade outputs are made again for it (gradients: the test above)
    for handle in handles:
        handle.remove()
    assert first_skip_alive_then == [False]


def test_a_checkpointed_condition_encoder_holds_one_block_at_a_time_in_backward():
    """One checkpoint around the whole encoding would hold every tensor it saves, all levels at once,
    when its backward recomputes it; with each block checkpointed inside it, one block's at a time."""
    from cpcbm_blocks.memory import _Recorder
    spec, _, conditions = _small_conditioned()
    encoder = _model(spec).conditioner
    raw = encoder.validate(**conditions)

    def backward_peak_and_grads(encode):
        encoder.zero_grad(set_to_none=True)
        recorder = _Recorder()
        recorder.exclude([*encoder.parameters(), *(v for v in raw.values() if v is not None)])
        with recorder:
            encoded = encode(**raw)
            loss = sum(m.square().mean() for m in encoded.maps.values())
            loss = loss + sum(c.square().mean() for c in encoded.context.values())
            recorder.set_phase("backward")
            loss.backward()
        return recorder.peak_by_phase["backward"], {n: p.grad.clone() for n, p in encoder.named_parameters()
                                                     if p.grad is not None}

    one_region, expected = backward_peak_and_grads(lambda **r: checkpoint(encoder.encode, use_reentrant=False, **r))
    nested, grads = backward_peak_and_grads(encoder.encode_checkpointed)
    plain, plain_grads = backward_peak_and_grads(encoder.encode)
    assert grads.keys() == expected.keys() == plain_grads.keys() and grads
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], msg=name)
        torch.testing.assert_close(grads[name], plain_grads[name], msg=name)
    assert nested < 0.8 * one_region, (nested, one_region)
