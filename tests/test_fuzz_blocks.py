"""Fuzzing the blocks used on their own: random constructor arguments and random inputs, valid or not.

What `tests/test_fuzz.py` asks of the whole UNet, asked of every public block built directly, as a
researcher importing one into their own model would: each draw must either

* build and run, with the output shape the block's contract promises, or
* raise one of the library's own errors (`CpcbmError`): a `SpecError` from the constructor, or an
  `InputError` / `ShapeContractError` from `forward` before any compute.

An error from inside torch (or Python's own `TypeError` from a bad argument) fails the property.
Run more examples with `HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_fuzz_blocks.py`.
"""

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cpcbm_blocks import (
    Conv3d,
    CpcbmError,
    CrossAttentionFusion3D,
    Downsample3D,
    DynamicConvFusion3D,
    GatedFusion3D,
    GatedInjection3D,
    MultiHeadSelfAttention3D,
    OutputHead,
    ResBlock3D,
    Upsample3D,
)

SIZES = st.integers(1, 4)
DTYPES = st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool])
KINDS = ["resblock", "down", "up", "attention", "head", "conv", "gated_injection", "dynamic_conv", "cross_attention",
         "gated_fusion"]


@st.composite
def tensors(draw, channels: int, *, rank: int = 5, batch: int = 2):
    """Mostly the tensor a block expects, `(batch, channels, d, h, w)`; sometimes another rank, channel count,
    batch or dtype."""
    d, h, w = draw(SIZES), draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    shape = {5: (batch, channels, d, h, w), 2: (batch, channels), 3: (batch, draw(SIZES), channels)}[rank]
    mistake = draw(st.sampled_from([None] * 6 + ["rank", "channels", "dtype", "batch"]))
    if mistake == "rank":
        shape = shape[1:] if draw(st.booleans()) else (*shape, 1)
    elif mistake == "channels":
        shape = (shape[0], channels + draw(st.integers(1, 3)), *shape[2:])
    elif mistake == "batch":
        shape = (shape[0] + 1, *shape[1:])
    return torch.randn(shape).to(draw(DTYPES) if mistake == "dtype" else torch.float32)


@st.composite
def block_calls(draw):
    """A block's constructor and a forward call on drawn inputs, as (kind, build, call): valid arguments, or with
    one mistake (a scalar for a triple, zero or negative counts, an even kernel, a string for a bool...)."""
    kind = draw(st.sampled_from(KINDS))
    mistake = draw(st.sampled_from([None, None, "channels", "groups", "kernel", "stride", "other"]))

    def pick(name, valid, invalid):
        return draw(invalid if name == mistake else valid)

    c = pick("channels", st.sampled_from([4, 8]), st.sampled_from([0, -4, 3]))
    groups = pick("groups", st.sampled_from([1, 2, 4]), st.sampled_from([0, 3, True]))
    kernel = pick("kernel", st.sampled_from([(3, 3, 3), (1, 3, 3), (1, 1, 1)]),
                  st.sampled_from([3, (2, 3, 3), (3, 3), (0, 1, 1), "3"]))
    stride = pick("stride", st.sampled_from([(2, 2, 2), (1, 2, 2), (1, 1, 1)]), st.sampled_from([2, (0, 2, 2), (2, 2)]))
    ok = max(c, 1) if isinstance(c, int) else 4  # the channels a well-formed input has
    batch = draw(st.sampled_from([1, 2]))  # batch 1 with 1x1x1 maps: one value per GroupNorm group
    x = draw(tensors(ok, batch=batch))
    if kind == "resblock":
        emb_channels = draw(st.sampled_from([None, 4]))
        args = dict(in_channels=c, out_channels=draw(st.sampled_from([4, 8])), emb_channels=emb_channels,
                    num_groups=groups, kernel_size=kernel,
                    timestep_injection=pick("other", st.sampled_from(["add", "scale_shift"]), st.just("film")),
                    dropout=pick("other", st.just(0.0), st.sampled_from([1.0, -0.5])))
        emb = draw(tensors(4, rank=2, batch=batch)) if emb_channels is not None or draw(st.booleans()) else None
        return kind, lambda: ResBlock3D(**args), lambda m: m(x, emb)
    if kind in ("down", "up"):
        cls = Downsample3D if kind == "down" else Upsample3D
        return kind, lambda: cls(channels=c, stride=stride, kernel_size=kernel), lambda m: m(x)
    if kind == "attention":
        args = dict(channels=c, head_channels=groups, num_groups=groups,
                    upcast=pick("other", st.booleans(), st.just("no")))
        return kind, lambda: MultiHeadSelfAttention3D(**args), lambda m: m(x)
    if kind == "head":
        return kind, lambda: OutputHead(in_channels=c, out_channels=1, num_groups=groups, kernel_size=kernel), \
            lambda m: m(x)
    if kind == "conv":
        shift = draw(st.sampled_from([None, torch.zeros(3), torch.zeros(2, 3)]))
        return kind, lambda: Conv3d(c, 3, kernel_size=kernel, stride=stride), lambda m: m(x, shift=shift)
    if kind == "gated_injection":
        condition = draw(tensors(ok, batch=batch))
        return kind, lambda: GatedInjection3D(channels=c), lambda m: m(x, condition)
    if kind == "dynamic_conv":
        args = dict(channels=c, num_experts=draw(st.sampled_from([1, 2])), kernel_size=kernel, num_groups=groups,
                    temperature=pick("other", st.sampled_from([1.0, 0.5]), st.sampled_from([0.0, -1.0, float("nan")])))
        condition = draw(tensors(ok, batch=batch))
        return kind, lambda: DynamicConvFusion3D(**args), lambda m: m(x, condition)
    if kind == "cross_attention":
        args = dict(channels=c, context_channels=6, head_channels=groups, num_groups=groups)
        context = draw(tensors(6, rank=3, batch=batch))
        mask = torch.ones(context.shape[:2], dtype=torch.bool) if context.ndim >= 2 else torch.ones(1, 1).bool()
        return kind, lambda: CrossAttentionFusion3D(**args), lambda m: m(x, context, mask)
    text = draw(tensors(6, rank=2, batch=batch))
    present = torch.ones(batch, dtype=torch.bool)
    return kind, lambda: GatedFusion3D(channels=c, text_channels=6), lambda m: m(text, x, present, present)


@settings(max_examples=max(60, settings.default.max_examples))
@given(block_calls())
def test_every_block_draw_runs_or_is_refused_by_our_own_error(draw):
    kind, build, call = draw
    torch.manual_seed(0)
    try:
        module = build()
    except CpcbmError:
        event(f"{kind}: refused at construction")
        return
    ran = []
    for name, child in module.named_modules():
        if name:  # a child running means compute started
            child.register_forward_pre_hook(lambda *_, name=name: ran.append(name))
    try:
        out = call(module)
    except CpcbmError as error:
        assert ran == [], f"{type(error).__name__} raised after compute had started ({ran}): {error}"
        event(f"{kind}: refused in forward")
        return
    assert isinstance(out, torch.Tensor) and torch.isfinite(out.float()).all()
    event(f"{kind}: ran")
