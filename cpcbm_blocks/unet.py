"""`UNet3D`: the documented diffusion UNet, run step by step with every transition asserted."""

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Real
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from cpcbm_blocks import checkpoint
from cpcbm_blocks.arguments import as_level_numbers, check_bool, check_optional_bool
from cpcbm_blocks.blocks.embedding import TimestepEmbedding, timesteps_to_batch
from cpcbm_blocks.build import build_blocks
from cpcbm_blocks.conditioning import ConditionEncoder, EncodedConditions, validate_conditions
from cpcbm_blocks.contracts import check_device_and_dtype, checks_active
from cpcbm_blocks.errors import InputError, TraceMismatchError
from cpcbm_blocks.layout import Op, Section, Step, layout
from cpcbm_blocks.plan import Plan, Transition, check_input_shape, plan
from cpcbm_blocks.recompute import recompute_memory_bound, selective_by_default
from cpcbm_blocks.rematerialize import (
    can_rematerialize,
    recomputable,
    recomputable_product,
    rematerialized_saves,
    rematerializing,
)
from cpcbm_blocks.spec import UNetSpec

__all__ = ["UNet3D"]


class UNet3D(nn.Module):
    """The 3D diffusion UNet described by a [`UNetSpec`][cpcbm_blocks.spec.UNetSpec].

    ```python
    model = UNet3D(UNetSpec.default())
    eps = model(x, t)   # x: (B, 1, 8, 256, 256); t: int/float, 0-d or (B,) tensor
    ```

    The network is the chain of steps given by [`layout(spec)`][cpcbm_blocks.layout.layout]:
    `forward` runs them in order, keeping skips on a stack (pushed on the way down, popped and
    concatenated on the way up). In eager mode with shape checks on, every step's actual shapes are
    compared with [`plan(spec, x.shape)`][cpcbm_blocks.plan.plan] as soon as the step returns, and a
    difference raises [`TraceMismatchError`][cpcbm_blocks.errors.TraceMismatchError] naming the step.
    Inputs are validated before any compute.

    Modules are registered once each under readable names (`blocks.down4_attn1`, `blocks.mid1_res2`,
    `blocks.up3_up`, ...), so state dicts read like the trace.

    A conditioned spec ([`UNetSpec.conditioned`][cpcbm_blocks.spec.UNetSpec.conditioned]) adds a
    `conditioner` ([`ConditionEncoder`][cpcbm_blocks.conditioning.ConditionEncoder]) and one fusion
    module per fusion step. Pass the raw conditions to `forward`, or encode them once with
    [`encode_conditions`][cpcbm_blocks.unet.UNet3D.encode_conditions] and pass `conditions=` at every
    denoising step.

    **Arguments:**

    - `spec`: the network, as data.
    """

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        if not isinstance(spec, UNetSpec):
            raise InputError(f"spec: expected a UNetSpec, got {type(spec).__name__}. Use UNetSpec.default() or build one.")
        self.spec = spec
        self.steps = layout(spec)
        self.time_embedding = TimestepEmbedding(channels=spec.base_channels, out_channels=spec.time_embedding_channels)
        self.blocks = build_blocks(spec)
        self.conditioner = ConditionEncoder(spec) if spec.is_conditioned else None
        self._trace_sink: list[Transition] | None = None
        self._checkpointed: frozenset[int] = frozenset()
        self._span: frozenset[int] = frozenset()
        self._remade_outputs: frozenset[int] = frozenset()
        self._checkpoint_conditions = False
        self._selective: bool | None = None  # None: by device (`selective_by_default`)

    def set_gradient_checkpointing(self, *, levels: Iterable[int] = (), mid: bool = False,
                                   conditions: bool = False, selective: bool | None = None) -> "UNet3D":
        """Recompute the steps of the given levels (and of the middle) in backward instead of saving them.

        Every step of a checkpointed level, on the way down and on the way up, keeps only its inputs
        for backward and computes again, when the gradient reaches it, what its backward needs.
        Attention and cross-attention steps run under `torch.utils.checkpoint` (non-reentrant), which
        runs their whole forward again. Residual blocks, samplers and dynamic-convolution fusion run
        inside [`rematerialized_saves(products=True)`][cpcbm_blocks.rematerialize.rematerialized_saves]:
        their convolution outputs are saved as recipes too, and in backward each convolution whose
        output a backward needs runs once more (a residual block's first; not its second, nor a
        sampler's, whose outputs no backward reads). The same memory as `torch.utils.checkpoint`, for
        fewer FLOPs; under autocast they fall back to `torch.utils.checkpoint`. Gradients are the same
        as without checkpointing (tested). A residual block takes its skip apart
        ([`ResBlock3D`][cpcbm_blocks.ResBlock3D]`(..., skip=)`), so at the large levels (from
        `SKIP_APART_MIN_BYTES`) no concatenation is made, in forward or in backward. Consecutive checkpointed
        steps share one `rematerialized_saves(products=True)`, so an output that is only the next step's
        input (the stem's, a downsampler's, an upsampler's, the block before a fusion on the way down) is
        not held either: the next step remakes it in its own backward. Nor are level 1's skips but
        its last once the decoder block that reads each has run its backward, which comes before the
        peak, in the backward of level 1's first decoder block. With
        `conditions=True` the condition encoder is checkpointed too
        ([`encode_checkpointed`][cpcbm_blocks.conditioning.ConditionEncoder.encode_checkpointed]: it keeps
        only the raw conditions, and its backward remakes one block at a time). Levels are numbered
        from 1 (shallowest); `levels=()`, `mid=False` and `conditions=False` switch it off. Only training (grad
        enabled) is affected. The setting lives on the module, not in the spec: it changes memory and
        time, never the function. Returns the model.

        Every other step (and the condition encoder) holds only what was expensive to compute.
        Residual blocks, downsamplers and upsamplers run inside
        [`rematerialized_saves()`][cpcbm_blocks.rematerialize.rematerialized_saves]: their norms,
        activations and concatenations are saved as recipes and remade one at a time in backward.
        Attention, fusion and the condition encoder run with selective recomputation
        ([`recompute_memory_bound`][cpcbm_blocks.recompute.recompute_memory_bound]): convolutions,
        matrix products and attention keep their outputs, memory-bound operators are recomputed.
        `selective=True` switches it on, `selective=False` off (every saved tensor is held, as plain
        PyTorch holds it), and `selective=None`, the default, decides by the device each step runs on
        (`selective_by_default`): on for the CPU, where it cuts the activations held for backward to
        about a third for a little more step time, off on a GPU, where each recomputed operator's
        dispatch and launch costs more than the memory-bound kernel itself (the performance page's
        memory, train-step and GPU tables measure both sides). It applies to eager training, not
        under `torch.compile`, whose partitioner makes that choice itself.
        """
        levels = as_level_numbers("UNet3D.set_gradient_checkpointing(levels=...)", levels, levels=len(self.spec.levels),
                                  error=InputError)
        for name, value in (("mid", mid), ("conditions", conditions)):
            check_bool(f"UNet3D.set_gradient_checkpointing({name}=...)", value, error=InputError)
        check_optional_bool("UNet3D.set_gradient_checkpointing(selective=...)", selective, error=InputError,
                            none_means="on for a CPU step, off for a GPU step")
        self._checkpoint_conditions = conditions
        self._selective = selective
        self._checkpointed = frozenset(position for position, step in enumerate(self.steps)
                                       if (step.section is Section.MID and mid)
                                       or (step.section in (Section.DOWN, Section.UP) and step.group in levels))
        self._span, self._remade_outputs = _spans_and_remade_outputs(self.steps, self._checkpointed)
        return self

    @property
    def gradient_checkpointing(self) -> tuple[tuple[int, ...], bool]:
        """The checkpointed `(levels, mid)`, as set by `set_gradient_checkpointing`."""
        steps = [self.steps[position] for position in self._checkpointed]
        levels = sorted({s.group for s in steps if s.section is not Section.MID})
        return tuple(levels), any(s.section is Section.MID for s in steps)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the spec and the weights into `directory` (see [`checkpoint`][cpcbm_blocks.checkpoint])."""
        return checkpoint.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> "UNet3D":
        """Build the model saved in `directory` by [`save_pretrained`][cpcbm_blocks.unet.UNet3D.save_pretrained]."""
        return checkpoint.from_pretrained(directory, device=device)

    def plan(self, input_shape: tuple[int, ...]) -> Plan:
        """The expected transitions for an input of `input_shape` (see [`plan`][cpcbm_blocks.plan.plan])."""
        return plan(self.spec, tuple(input_shape))

    def encode_conditions(self, *, text: Float[Tensor, "b m e"] | None = None, text_mask: Bool[Tensor, "b m"] | None = None,
                          text_pooled: Float[Tensor, "b e"] | None = None,
                          cond_images: Float[Tensor, "b k d h w"] | None = None,
                          cond_available: Bool[Tensor, "b k"] | None = None) -> EncodedConditions:
        """Encode the conditions once; reuse the result for every denoising step of a sampler.

        **Arguments:**

        - `text`: token embeddings from a pre-trained text encoder (e.g. CLIP's last hidden state).
        - `text_mask`: True for real tokens; an all-False row marks that sample's text as absent
          (learned null tokens stand in). Defaults to all True.
        - `text_pooled`: the encoder's pooled vector; defaults to the masked mean of the tokens.
        - `cond_images`: k conditional images co-registered with `x`.
        - `cond_available`: True where an image is present; an absent image is zeros plus a False
          flag. Defaults to all True.

        Every argument the spec's conditioning needs is required, and none it does not use is
        accepted ([`InputError`][cpcbm_blocks.errors.InputError] otherwise).
        """
        if self.conditioner is None:
            validate_conditions(self.spec, text=text, text_mask=text_mask, text_pooled=text_pooled,
                                cond_images=cond_images, cond_available=cond_available)
            raise InputError("encode_conditions: this UNet's spec has no conditioning (UNetSpec.conditioning is None). "
                             "Build the UNet from UNetSpec.conditioned(...).")
        return self.conditioner(text=text, text_mask=text_mask, text_pooled=text_pooled, cond_images=cond_images,
                                cond_available=cond_available)

    def forward(self, x: Float[Tensor, "b c_in d h w"], t: int | float | Real[Tensor, ""] | Real[Tensor, " b"], *,
                text: Float[Tensor, "b m e"] | None = None, text_mask: Bool[Tensor, "b m"] | None = None,
                text_pooled: Float[Tensor, "b e"] | None = None, cond_images: Float[Tensor, "b k d h w"] | None = None,
                cond_available: Bool[Tensor, "b k"] | None = None,
                conditions: EncodedConditions | None = None) -> Float[Tensor, "b c_out d h w"]:
        """Predict from the noisy volume `x` at diffusion time `t` (and the conditions, if any).

        `c_in` is `spec.in_channels` and `c_out` is `spec.out_channels`; D, H and W must be multiples
        of `spec.stride_product`. The arguments are validated explicitly (with messages that say
        what to do) and every transition is checked against the plan, which covers the return.
        Conditions are either raw (the keyword arguments of
        [`encode_conditions`][cpcbm_blocks.unet.UNet3D.encode_conditions]) or already encoded
        (`conditions=`), not both.
        """
        checking, compiling = checks_active(), torch.compiler.is_compiling()
        expected = None
        raw = {"text": text, "text_mask": text_mask, "text_pooled": text_pooled, "cond_images": cond_images,
               "cond_available": cond_available}
        if not compiling:
            check_volume(x, self.spec, like=self.time_embedding.mlp[0].weight)
            t = timesteps_to_batch(t, batch_size=x.shape[0], device=x.device)
            _reject_misplaced_conditions(self.spec, conditions, raw)
            planned = plan(self.spec, tuple(x.shape)).transitions  # also validates the shape against the spec
            if checking or self._trace_sink is not None:
                expected = planned
        selective = ((selective_by_default(x) if self._selective is None else self._selective)
                     and torch.is_grad_enabled() and not compiling)
        if self.conditioner is not None and conditions is None:
            raw = self.conditioner.validate(**raw)  # refuses conditions that do not fit before any compute
            if not compiling:
                batch = (text if text is not None else cond_images).shape[0]
                image_size = None if cond_images is None else tuple(cond_images.shape[2:])
                _check_conditions_match(x, batch_size=batch, image_size=image_size,
                                        name="text" if text is not None else "cond_images")
            if self._checkpoint_conditions and torch.is_grad_enabled():
                conditions = self.conditioner.encode_checkpointed(**raw)
            elif selective:
                conditions = recompute_memory_bound(self.conditioner.encode, **raw)
            else:
                conditions = self.conditioner.encode(**raw)
        elif conditions is not None and not compiling:
            _check_conditions_match(x, batch_size=conditions.batch_size, image_size=conditions.image_size,
                                    name="conditions")
            self.conditioner.check_encoded(conditions, planned)  # sites, shapes, dtype and device of this model
        emb = self.time_embedding(t, batch_size=x.shape[0])
        if conditions is not None:
            if conditions.timestep_scale_shift is not None:
                scale, shift = conditions.timestep_scale_shift.chunk(2, dim=1)
                emb = emb * (1 + scale) + shift

        h, skips = x, []
        # Consecutive checkpointed steps share one rematerialized_saves(products=True), so that an encoder
        # output which is not a skip can be saved by the next step as its recipe (see `_spans_and_remade_outputs`).
        with contextlib.ExitStack() as span:
            for position, step in enumerate(self.steps):
                block = self.blocks[step.module_key]
                skip = skips.pop() if step.takes_skip else None
                h_in = h
                if position in self._span and torch.is_grad_enabled() and can_rematerialize():
                    if not rematerializing():
                        span.enter_context(rematerialized_saves(products=True))
                    run = _call if position not in self._remade_outputs else (
                        recomputable if step.op is Op.CONV_IN else recomputable_product)  # the stem: cheap, rerun
                    h = run(_run_step, step, block, h, skip, emb, conditions)
                else:
                    span.close()
                    if position in self._checkpointed and torch.is_grad_enabled():
                        h = recompute_in_backward(_run_step, step, block, h, skip, emb, conditions, use_reentrant=False)
                    elif selective and step.op in _REMATERIALIZED and can_rematerialize():
                        with rematerialized_saves():
                            h = _run_step(step, block, h, skip, emb, conditions)
                    elif selective:
                        h = recompute_memory_bound(_run_step, step, block, h, skip, emb, conditions)
                    else:
                        h = _run_step(step, block, h, skip, emb, conditions)
                if expected is not None:
                    self._observe(expected[position], h_in, skip, h, raise_on_mismatch=checking)
                if step.gives_skip:
                    skips.append(h)
        return h

    def _observe(self, expected: Transition, h_in: Tensor, skip: Tensor | None, h_out: Tensor, *,
                 raise_on_mismatch: bool) -> None:
        actual = Transition(step=expected.step, in_shape=tuple(h_in.shape[1:]),
                            skip_shape=None if skip is None else tuple(skip.shape[1:]), out_shape=tuple(h_out.shape[1:]))
        if self._trace_sink is not None:
            self._trace_sink.append(actual)
        if raise_on_mismatch and actual != expected:
            raise TraceMismatchError(f"{expected.step.describe()}: expected {expected.render()}, "
                                     f"got {actual.render()}.")


_REMATERIALIZED = frozenset({Op.RES, Op.DOWN, Op.UP, Op.FUSE_DYNAMIC_CONV})
"""Steps that train inside `rematerialized_saves()` rather than a selective checkpoint: their norms,
activations and FiLM maps are saved as recipes and remade one at a time in backward, and nothing
holds a convolution output that no backward needs (the second convolution of a residual block, the
parity outputs of the sub-pixel upsample). Where recipes cannot apply (under autocast) they fall
back to the selective checkpoint like every other step."""


def _spans_and_remade_outputs(steps: tuple[Step, ...], checkpointed: frozenset[int]
                              ) -> tuple[frozenset[int], frozenset[int]]:
    """The steps that run in shared `rematerialized_saves(products=True)` spans, and those among them
    whose output is saved by the next step as its recipe (the step itself) rather than held.

    A checkpointed step holds its input. On the way down that input lives until the encoder's own
    backward, after the whole decoder's: it sits through the peak, which comes in the backward of
    the full-resolution decoder blocks. An encoder output that is not a skip (the stem's, the block
    before a fusion, a downsampler's) is only the next step's input: the next step remakes it in its
    own backward (one more forward of the step) instead of holding it through the decoder. On the
    way up, an upsampler's output is held through the backward of every later step of its level,
    and it is cheap to make (one convolution at the coarser level): it is remade too. An output is
    remade only where the next step is in the same span (otherwise nothing would save it as a
    recipe) and, with two exceptions, where the step's own input is not remade, so that one remake
    does not run a chain of steps. The stem's output, when remade, is a cheap recipe (one
    convolution of the input's few channels), run again at each use rather than kept; the stem joins
    level 1's span when its output is remade.

    First exception: level 1's skips but its last. The decoder reads a level's skips in reverse, so
    the backward of the block that reads the first skip comes before that of the level's first
    decoder block, where the peak is; from then on the skip is only the next encoder step's input.
    It is remade (from the stem, at level 1's first block: a chain, each link kept once made until
    its own step's backward), which lowers a checkpointed step's planned peak at 256x256 by 50 MiB in
    the default spec and by 34 MiB in the conditioned one (with the weight-gradient forms an AVX-512
    CPU times), for one more forward of the block (3% of the default's step FLOPs, 2% of the
    conditioned one's). Deeper levels' skips are
    read after that peak and keep the rule.

    Second exception: level 2's decoder. Its outputs are the inputs of its later steps, so they are held
    from the forward until their own backward, which comes after the whole level-1 decoder's, where
    the peak is (56 MiB at 256x256 in the conditioned default). They are remade as one chain from the
    level's upsampler: the backward of the level's last step remakes them all (about a third more
    of that level's decoder forward: 3-4% of a checkpointed step), and each goes once the step that
    reads it has run its backward. The last output of the level, the top upsampler's input, stays
    held: remaking it would bring the whole chain back into level 1's backward. Deeper levels hold
    less (12 MiB at level 3) for as much arithmetic, so they keep the rule.
    """
    span = {position for position in checkpointed if steps[position].op in _REMATERIALIZED}
    level_1_skips = [position for position, step in enumerate(steps)
                     if step.section is Section.DOWN and step.group == 1 and step.gives_skip]
    early_skips = set(level_1_skips[:-1])
    remade: set[int] = set()
    for position, step in enumerate(steps[:-1]):
        if not ((position in span or step.op is Op.CONV_IN) and position + 1 in span):
            continue
        encoder_only_input = step.section is Section.DOWN and not step.gives_skip
        if position in early_skips:
            remade.add(position)  # the first exception (see the docstring)
        elif (encoder_only_input or step.op is Op.UP) and (position - 1 not in remade or position - 1 in early_skips):
            remade.add(position)
        elif step.section is Section.UP and step.group == 2 and steps[position + 1].group == 2:
            remade.add(position)  # a chain within level 2's decoder (see the docstring)
    return frozenset(span | remade), frozenset(remade)


def _call(fn, *args):
    return fn(*args)


def _run_step(step: Step, block: nn.Module, h: Tensor, skip: Tensor | None, emb: Tensor,
              conditions: EncodedConditions | None) -> Tensor:
    """One step: run the step's module with what its op takes; a residual block takes its skip apart
    (`ResBlock3D(..., skip=)` never builds the concatenation), any other op the concatenation."""
    if step.op is Op.RES:
        return block(h, emb, skip=skip)
    if skip is not None:
        h = recomputable(torch.cat, [h, skip], dim=1)
    if step.op is Op.FUSE_CROSS_ATTENTION:
        return block(h, conditions.context[step.condition_key], conditions.context_mask[step.condition_key])
    if step.op.is_fusion:
        return block(h, conditions.maps[step.condition_key].expand_as(h))
    return block(h)


def _reject_misplaced_conditions(spec: UNetSpec, conditions: EncodedConditions | None, raw: dict) -> None:
    """Conditions for an unconditioned spec, both raw and encoded ones, or a wrong type: refuse."""
    given = [name for name, value in raw.items() if value is not None]
    if spec.conditioning is None:
        if given:
            validate_conditions(spec, **raw)  # raises "this UNet's spec has no conditioning"
        if conditions is not None:
            raise InputError("conditions: expected None because this UNet's spec has no conditioning "
                             f"(UNetSpec.conditioning is None), got {type(conditions).__name__}. Drop conditions= or build the UNet from UNetSpec.conditioned(...).")
    elif conditions is not None:
        if not isinstance(conditions, EncodedConditions):
            raise InputError(f"conditions: expected EncodedConditions from model.encode_conditions(...), got "
                             f"{type(conditions).__name__}.")
        if given:
            raise InputError(f"{given[0]}: expected either raw conditions or conditions=, got both. Pass one or the other.")


def _check_conditions_match(x: Tensor, *, batch_size: int, image_size: tuple[int, ...] | None, name: str) -> None:
    """Conditions (raw or encoded) must have x's batch size, and conditional images x's depth, height and width."""
    if batch_size != x.shape[0]:
        raise InputError(f"{name}: expected the batch size of x ({x.shape[0]}), got conditions for "
                         f"{batch_size} sample(s). Give one row of conditions per sample of x.")
    if image_size is not None and tuple(image_size) != tuple(x.shape[2:]):
        raise InputError(f"cond_images: expected depth, height and width {tuple(x.shape[2:])} (those of x), got "
                         f"{tuple(image_size)}. Resample the conditional images onto x's grid.")


def check_volume(x: Tensor, spec: UNetSpec, *, like: Tensor) -> None:
    """Validate `x` against the spec and against the model's weights (`like`): type, dtype, device, shape."""
    if not isinstance(x, Tensor):
        raise InputError(f"x: expected a torch.Tensor of shape (batch, {spec.in_channels}, depth, height, width), "
                         f"got {type(x).__name__}. Convert it with torch.as_tensor(...).")
    if not x.is_floating_point():
        raise InputError(f"x: expected a floating-point tensor (float32, bfloat16 or float16), got {x.dtype}. "
                         "Convert it with x.float().")
    check_device_and_dtype("x", x, like=like)
    check_input_shape(spec, x.shape, name="x")
