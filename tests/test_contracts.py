"""`shape_checked`: floating-point inputs in the weights' dtype and on their device, and a first line that names the argument.

Blocks used on their own, outside `UNet3D` (which checks its inputs itself), must refuse a float64 or
float16 volume before any compute, where torch would otherwise fail deep inside the first layer
("mixed dtype (CPU)", "mat1 and mat2 must have the same dtype") or, for an element-wise block,
silently return float64.
"""

import pytest
import torch

from cpcbm_blocks import (
    Conv3d,
    CrossAttentionFusion3D,
    Downsample3D,
    DynamicConvFusion3D,
    GatedFusion3D,
    GatedInjection3D,
    InputError,
    MultiHeadSelfAttention3D,
    OutputHead,
    ResBlock3D,
    ShapeContractError,
    Upsample3D,
    set_shape_checks,
    shape_checks,
)
from cpcbm_blocks.blocks.attention import attention
from cpcbm_blocks.contracts import checks_active

B, C = 2, 8


def volume(dtype=torch.float32):
    return torch.randn(B, C, 2, 4, 4, dtype=dtype)


# (block, call with the volume in each floating-point argument: the name of that argument is the key)
BLOCKS = {
    "ResBlock3D": (lambda: ResBlock3D(in_channels=C, out_channels=C, emb_channels=4, num_groups=4),
                   {"x": lambda m, v, ok: m(v, ok(B, 4)), "emb": lambda m, v, ok: m(ok(B, C, 2, 4, 4), v[:, :4, 0, 0, 0])}),
    "Downsample3D": (lambda: Downsample3D(channels=C, stride=(1, 2, 2)), {"x": lambda m, v, ok: m(v)}),
    "Upsample3D": (lambda: Upsample3D(channels=C, stride=(1, 2, 2)), {"x": lambda m, v, ok: m(v)}),
    "MultiHeadSelfAttention3D": (lambda: MultiHeadSelfAttention3D(channels=C, head_channels=4, num_groups=4),
                                 {"x": lambda m, v, ok: m(v)}),
    "OutputHead": (lambda: OutputHead(in_channels=C, out_channels=1, num_groups=4), {"x": lambda m, v, ok: m(v)}),
    "Conv3d": (lambda: Conv3d(C, 4, kernel_size=(3, 3, 3)),
               {"x": lambda m, v, ok: m(v), "shift": lambda m, v, ok: m(ok(B, C, 2, 4, 4), shift=v[0, :4, 0, 0, 0])}),
    "GatedInjection3D": (lambda: GatedInjection3D(channels=C),
                         {"x": lambda m, v, ok: m(v, ok(B, C, 2, 4, 4)),
                          "condition": lambda m, v, ok: m(ok(B, C, 2, 4, 4), v)}),
    "DynamicConvFusion3D": (lambda: DynamicConvFusion3D(channels=C, num_groups=4),
                            {"x": lambda m, v, ok: m(v, ok(B, C, 2, 4, 4)),
                             "condition": lambda m, v, ok: m(ok(B, C, 2, 4, 4), v)}),
    "CrossAttentionFusion3D": (lambda: CrossAttentionFusion3D(channels=C, context_channels=6, head_channels=4,
                                                              num_groups=4),
                               {"context": lambda m, v, ok: m(ok(B, C, 2, 4, 4), v[:, :6, 0, 0, :3].transpose(1, 2),
                                                              torch.ones(B, 3, dtype=torch.bool))}),
    "GatedFusion3D": (lambda: GatedFusion3D(channels=C, text_channels=6),
                      {"text": lambda m, v, ok: m(v[:, :6, 0, 0, 0], ok(B, C, 2, 4, 4), torch.ones(B, dtype=torch.bool),
                                                  torch.ones(B, dtype=torch.bool))}),
}
CASES = [(block, argument) for block, (_, calls) in BLOCKS.items() for argument in calls]


@pytest.mark.parametrize(("block", "argument"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_block_refuses_a_floating_input_in_another_dtype_than_its_weights(block, argument, dtype):
    build, calls = BLOCKS[block]
    with pytest.raises(InputError, match=rf"{block}\.forward: {argument}: expected dtype torch.float32 \(the model's "
                                         rf"weights\), got {dtype}\. Convert it with {argument}\.to\(torch.float32\)"):
        calls[argument](build(), volume(dtype), torch.randn)


@pytest.mark.parametrize(("block", "argument"), CASES)
def test_a_block_accepts_its_own_dtype_a_cast_model_and_float32_under_autocast(block, argument):
    build, calls = BLOCKS[block]
    torch.manual_seed(0)
    module = build()
    assert calls[argument](module, volume(), torch.randn).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 in, bf16 weights' copies: autocast casts per operation
        calls[argument](module, volume(), torch.randn)

    def bf16(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16)

    assert calls[argument](module.to(torch.bfloat16), volume(torch.bfloat16), bf16).dtype == torch.bfloat16


def test_a_function_refuses_arguments_unlike_its_first_floating_one():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(InputError, match=r"attention: k: expected a tensor like q \(torch.float32 on cpu\), got "
                                         r"torch.float64 on cpu\. Convert it with k\.to\(q\)"):
        attention(q, q.double(), q)


def test_the_first_line_names_the_argument_its_annotation_with_sizes_filled_in_and_the_actual_shape():
    block = ResBlock3D(in_channels=C, out_channels=C, emb_channels=4, num_groups=4)
    with pytest.raises(ShapeContractError) as raised:
        block(volume(), torch.randn(B + 1, 4))  # an optional argument: beartype's own reason is a dump of the tensor
    first = str(raised.value).splitlines()[0]
    assert first.startswith("ResBlock3D.forward: emb: expected Float[Tensor, 'b 4'] | None (sizes bound so far: b=2, ")
    assert "got f32[3,4]" in first and "tensor(" not in first
    with pytest.raises(ShapeContractError, match=r"^ResBlock3D.forward: x: expected Float\[Tensor, 'b c d h w'\], got "
                                                 r"f32\[8,2,4,4\] \(as this array has 4 dimensions, not the 5"):
        block(volume()[0], torch.randn(B, 4))


def test_the_switch_takes_only_a_bool_and_a_refused_value_changes_nothing():
    for wrong in ("false", 0, None):
        with pytest.raises(InputError, match=rf"set_shape_checks: enabled: expected True or False, got {wrong!r}"):
            set_shape_checks(wrong)
        with pytest.raises(InputError, match=r"shape_checks: enabled: expected True or False"):
            with shape_checks(wrong):
                pass
    assert checks_active()


def test_the_timestep_embedding_refuses_a_batch_size_that_is_not_a_positive_int():
    from cpcbm_blocks import TimestepEmbedding

    embedding = TimestepEmbedding(channels=8, out_channels=16)
    assert embedding(5, batch_size=3).shape == (3, 16)
    for wrong in (-1, 0, True):
        with pytest.raises(InputError, match=rf"TimestepEmbedding.forward: batch_size: expected an int >= 1, got "
                                             rf"{wrong!r}\. Pass the batch of x, x.shape\[0\]"):
            embedding(5, batch_size=wrong)
    with pytest.raises(ShapeContractError, match=r"^TimestepEmbedding.forward: batch_size: expected int \| None"):
        embedding(5, batch_size=2.0)  # not an int at all: the annotation's own check


ONE_CHANNEL_PER_GROUP = {  # (block with C channels in C groups, its call on a (batch, C, 1, 1, 1) map)
    "ResBlock3D": (lambda: ResBlock3D(in_channels=C, out_channels=C, emb_channels=4, num_groups=C),
                   lambda m, x: m(x, torch.randn(x.shape[0], 4))),
    "MultiHeadSelfAttention3D": (lambda: MultiHeadSelfAttention3D(channels=C, head_channels=4, num_groups=C),
                                 lambda m, x: m(x)),
    "OutputHead": (lambda: OutputHead(in_channels=C, out_channels=1, num_groups=C), lambda m, x: m(x)),
    "DynamicConvFusion3D": (lambda: DynamicConvFusion3D(channels=C, num_groups=C), lambda m, x: m(x, x)),
    "CrossAttentionFusion3D": (lambda: CrossAttentionFusion3D(channels=C, context_channels=6, head_channels=4,
                                                              num_groups=C),
                               lambda m, x: m(x, torch.randn(x.shape[0], 3, 6), torch.ones(x.shape[0], 3).bool())),
}


@pytest.mark.parametrize("block", ONE_CHANNEL_PER_GROUP)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_a_block_refuses_a_map_that_leaves_one_value_per_group_norm_group(block, batch, training):
    # torch raises only in training with a batch of 1; otherwise GroupNorm returns zeros in silence
    build, call = ONE_CHANNEL_PER_GROUP[block]
    module = build().train(training)
    with pytest.raises(InputError, match=rf"{block}.forward: x: expected at least 2 values per GroupNorm group and "
                                         rf"sample .* got 1: {C} channels in {C} groups on a 1x1x1 volume"):
        call(module, torch.randn(batch, C, 1, 1, 1))
    assert call(module, torch.randn(batch, C, 1, 1, 2)).shape[2:] == (1, 1, 2)  # 2 values per group: fine


def test_mixed_precision_with_float32_norms_and_any_autocast_input_dtype_is_accepted():
    block = ResBlock3D(in_channels=C, out_channels=C, emb_channels=4, num_groups=4).bfloat16()
    block.norm1.float(), block.norm2.float()  # norms kept in float32: the first parameter is a float32 norm weight
    assert block(volume(torch.bfloat16), torch.randn(B, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    plain = ResBlock3D(in_channels=C, out_channels=C, emb_channels=4, num_groups=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float16 as well; only float64 is refused
        plain(volume(torch.float16), torch.randn(B, 4))
        with pytest.raises(InputError, match=r"got torch.float64\. Convert it with x.to\(torch.float32\), cast the "
                                             r"model with model.to\(torch.float64\)\.$"):
            plain(volume(torch.float64), torch.randn(B, 4))


def test_an_argument_the_block_was_built_without_is_named_as_one_to_leave_out():
    block = ResBlock3D(in_channels=C, out_channels=C, emb_channels=None, num_groups=4)
    with pytest.raises(ShapeContractError, match=r"^ResBlock3D.forward: emb: expected .* got f32\[2,4\] \(this block was "
                                                 r"built with emb_channels=None, so emb must be None\)"):
        block(volume(), torch.randn(B, 4))
