"""Conditions in, per-level condition features out: validation, encoding once, reuse every step.

A conditioned [`UNet3D`][cpcbm_blocks.unet.UNet3D] takes text tokens (from a pre-trained text
encoder, computed ahead of time) and conditional images. Nothing here depends on `x` or `t`, so
[`ConditionEncoder`][cpcbm_blocks.conditioning.ConditionEncoder] runs once per sample and its
[`EncodedConditions`][cpcbm_blocks.conditioning.EncodedConditions] are reused for every denoising
step of a sampler:

```python
conditions = model.encode_conditions(text=tokens, text_mask=mask, cond_images=images, cond_available=avail)
for t in scheduler.timesteps:
    eps = model(x, t, conditions=conditions)
```

Absence is explicit and never a special shape: a sample's text is absent when its `text_mask` row
is all False (learned null tokens then stand in), an image is absent when its `cond_available` flag
is False (it is zeroed and flagged). Every parameter takes part in every forward, present or not, so
`DistributedDataParallel(find_unused_parameters=False)` works whatever is dropped.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cpcbm_blocks.blocks.cond_image_encoder import CondImageEncoder3D
from cpcbm_blocks.blocks.fusion_gated import GatedFusion3D
from cpcbm_blocks.contracts import check_device_and_dtype
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.layout import Op, layout
from cpcbm_blocks.plan import Transition, check_input_shape
from cpcbm_blocks.spec import FusionKind, UNetSpec

__all__ = ["ConditionEncoder", "EncodedConditions", "condition_sites"]


@dataclass(frozen=True)
class EncodedConditions:
    """Per-level condition features for one batch, ready for every denoising step.

    Produced by [`UNet3D.encode_conditions`][cpcbm_blocks.unet.UNet3D.encode_conditions]; pass it
    to `model(x, t, conditions=...)`.
    """

    batch_size: int
    image_size: tuple[int, int, int] | None
    """(D, H, W) of the conditional images, which `x` must match; None without images."""
    maps: dict[str, Tensor]
    """Condition map per site (`level1`.., `mid`) for gated and dynamic-convolution fusion; text-only
    maps are `(B, C, 1, 1, 1)` and broadcast over the volume."""
    context: dict[str, Tensor]
    """Condition tokens `(B, M, E)` per cross-attention site."""
    context_mask: dict[str, Tensor]
    """Which of those tokens are real, `(B, M)`."""
    timestep_scale_shift: Tensor | None
    """`(B, 2 * time_embedding_channels)` when pooled text modulates the timestep embedding."""


def condition_sites(spec: UNetSpec) -> dict[str, tuple[FusionKind, int]]:
    """The sites that fuse a condition (`level<n>` and `mid`), with their fusion kind and channels."""
    sites = {f"level{n}": (lv.fusion, lv.channels) for n, lv in enumerate(spec.levels, start=1)}
    sites["mid"] = (spec.mid.fusion, spec.levels[-1].channels)
    return {key: value for key, value in sites.items() if value[0] is not FusionKind.NONE}


class ConditionEncoder(nn.Module):
    """Turns raw conditions into [`EncodedConditions`][cpcbm_blocks.conditioning.EncodedConditions].

    Built by `UNet3D` from `spec.conditioning`; holds the conditional-image encoder, the learned null
    text, one [`GatedFusion3D`][cpcbm_blocks.blocks.fusion_gated.GatedFusion3D] per gated or
    dynamic-convolution site (text and images fused by a gate, no alignment step), the projection of
    pooled image tokens for cross-attention, and the optional text-to-timestep modulation.
    """

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        if spec.conditioning is None:
            raise InputError("spec: expected a conditioned UNetSpec (conditioning set), got conditioning=None. "
                             "Use UNetSpec.conditioned().")
        self.spec = spec
        cond = spec.conditioning
        self.sites = condition_sites(spec)
        # index into the image encoder's outputs: levels 1..L, then the middle
        self.feature_index = {key: (len(spec.levels) if key == "mid" else int(key[len("level"):]) - 1)
                              for key in self.sites}
        if cond.has_images:
            downs = [s for s in layout(spec) if s.op is Op.DOWN]
            self.image_encoder = CondImageEncoder3D(
                image_channels=cond.image_channels, channels=tuple(lv.channels for lv in spec.levels),
                strides=tuple(lv.stride for lv in spec.levels), kernel_sizes=tuple(lv.kernel_size for lv in spec.levels),
                down_kernel_sizes=tuple(s.kernel_size for s in downs), num_groups=spec.num_groups)
        if cond.has_text:
            e = cond.text_channels
            self.null_text_tokens = nn.Parameter(torch.randn(cond.num_null_text_tokens, e) * 0.02)
            self.null_text_pooled = nn.Parameter(torch.zeros(e))
        self.gated = nn.ModuleDict()
        self.text_maps = nn.ModuleDict()
        self.image_tokens = nn.ModuleDict()
        for key, (kind, channels) in self.sites.items():
            if kind is FusionKind.CROSS_ATTENTION:
                if cond.has_images:
                    self.image_tokens[key] = nn.Linear(channels, cond.text_channels)
            elif cond.has_text and cond.has_images:
                self.gated[key] = GatedFusion3D(channels=channels, text_channels=cond.text_channels)
            elif cond.has_text:
                self.text_maps[key] = nn.Linear(cond.text_channels, channels)
        self.timestep_modulation = None
        if cond.text_to_timestep:
            self.timestep_modulation = nn.Linear(cond.text_channels, 2 * spec.time_embedding_channels)
            nn.init.zeros_(self.timestep_modulation.weight)
            nn.init.zeros_(self.timestep_modulation.bias)

    def validate(self, *, text: Tensor | None = None, text_mask: Tensor | None = None,
                 text_pooled: Tensor | None = None, cond_images: Tensor | None = None,
                 cond_available: Tensor | None = None) -> dict[str, Tensor | None]:
        """Check the raw conditions against the spec and this encoder's device and dtype.

        Returns them ready for `encode`, with
        missing masks filled in as "all present". Raises
        [`InputError`][cpcbm_blocks.errors.InputError] before any compute.
        """
        _, text_mask, cond_available = validate_conditions(
            self.spec, text=text, text_mask=text_mask, text_pooled=text_pooled, cond_images=cond_images,
            cond_available=cond_available)
        conditions = {"text": text, "text_mask": text_mask, "text_pooled": text_pooled, "cond_images": cond_images,
                      "cond_available": cond_available}
        if not torch.compiler.is_compiling():
            self._check_devices_and_dtypes(**conditions)
        return conditions

    def _check_devices_and_dtypes(self, **conditions: Tensor | None) -> None:
        like = next(self.parameters())
        for name, value in conditions.items():
            if value is None:
                continue
            if value.is_floating_point():
                check_device_and_dtype(name, value, like=like)
            elif value.device != like.device:
                raise InputError(f"{name}: expected a tensor on the model's device {like.device}, got one on "
                                 f"{value.device}. Move it with {name}.to({str(like.device)!r}).")

    def check_encoded(self, conditions: EncodedConditions, transitions: Sequence[Transition]) -> None:
        """Refuse `conditions` that another model encoded (other fusion sites, channels, dtype or device).

        `transitions` is the plan of the forward they are passed to; each fusion step in it says
        which site it reads and at which shape. Raises [`InputError`][cpcbm_blocks.errors.InputError]
        before any compute (the batch size and image size are checked by the caller, against `x`).
        """
        again = "Encode them with this model: model.encode_conditions(...) (or guidance_conditions(model, ...))."
        expected_maps = sorted(key for key, (kind, _) in self.sites.items() if kind is not FusionKind.CROSS_ATTENTION)
        expected_context = sorted(key for key, (kind, _) in self.sites.items() if kind is FusionKind.CROSS_ATTENTION)
        got_maps, got_context = sorted(conditions.maps), sorted(conditions.context)
        if got_maps != expected_maps or got_context != expected_context or sorted(conditions.context_mask) != got_context:
            raise InputError(f"conditions: expected features for this model's fusion sites (maps {expected_maps}, "
                             f"context {expected_context}), got maps {got_maps}, context {got_context}, context_mask "
                             f"{sorted(conditions.context_mask)}: they were encoded by a model of another spec. {again}")
        batch, cond = conditions.batch_size, self.spec.conditioning
        expected: dict[str, tuple[object, tuple[int, ...], bool]] = {}  # name -> (value, shape, floating)
        for transition in transitions:
            step = transition.step
            if not step.op.is_fusion:
                continue
            key, (channels, d, h, w) = step.condition_key, transition.in_shape
            if key in expected_context:
                context, mask = conditions.context[key], conditions.context_mask[key]
                tokens = context.shape[1] if isinstance(context, Tensor) and context.ndim == 3 else "m"
                expected[f"context[{key!r}]"] = (context, (batch, tokens, cond.text_channels), True)
                expected[f"context_mask[{key!r}]"] = (mask, (batch, tokens), False)
            else:
                spatial = (1, 1, 1) if key in self.text_maps else (d, h, w)
                expected[f"maps[{key!r}]"] = (conditions.maps[key], (batch, channels, *spatial), True)
        if self.timestep_modulation is not None:
            expected["timestep_scale_shift"] = (conditions.timestep_scale_shift,
                                                (batch, self.timestep_modulation.out_features), True)
        elif conditions.timestep_scale_shift is not None:
            raise InputError("conditions.timestep_scale_shift: expected None because this model's spec does not modulate "
                             "the timestep embedding with text (conditioning.text_to_timestep=False), got a tensor of "
                             f"{_describe(conditions.timestep_scale_shift)}: they were encoded by a model of another "
                             f"spec. {again}")
        like = next(self.parameters())
        for name, (value, shape, floating) in expected.items():
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise InputError(f"conditions.{name}: expected a tensor of shape {shape} for this model, got "
                                 f"{_describe(value)}: they were encoded by a model of another spec. {again}")
            if value.is_floating_point() != floating or (not floating and value.dtype != torch.bool):
                raise InputError(f"conditions.{name}: expected a {'floating-point' if floating else 'bool'} tensor, got "
                                 f"{value.dtype}. {again}")
            if floating:
                try:
                    check_device_and_dtype(f"conditions.{name}", value, like=like)
                except InputError as error:
                    raise InputError(f"conditions.{name}: expected conditions encoded on the model's device {like.device} "
                                     f"in its dtype {like.dtype}, got {value.dtype} on {value.device}. Encode them again "
                                     "with this model after moving or casting it (model.encode_conditions(...)), or run "
                                     "under torch.autocast.") from error
            elif value.device != like.device:
                raise InputError(f"conditions.{name}: expected a tensor on the model's device {like.device}, got one on "
                                 f"{value.device}. Encode the conditions again after moving the model.")

    def encode_checkpointed(self, **conditions: Tensor | None) -> EncodedConditions:
        """`encode(**conditions)` under gradient checkpointing: it holds only the raw conditions for backward.

        The whole encoding runs under a non-reentrant `torch.utils.checkpoint`, and inside it each
        full-size block (the image encoder's convolution, residual blocks and downsamplings, the
        gates) under one more. In backward the outer region runs again holding only each block's
        input, and each block then runs once more, alone, for its own backward. A single region
        would hold every tensor the encoding saves, all levels at once: at (1, 1, 8, 256, 256) that
        transient (13 full-resolution maps of 64 MiB) was the peak of a checkpointed conditioned
        training step. The price is a third forward of the encoder's blocks.
        """
        return checkpoint(self.encode, use_reentrant=False, checkpoint_blocks=True, **conditions)

    def forward(self, *, text: Tensor | None = None, text_mask: Tensor | None = None, text_pooled: Tensor | None = None,
                cond_images: Tensor | None = None, cond_available: Tensor | None = None) -> EncodedConditions:
        """Validate, then encode (see `validate`)."""
        return self.encode(**self.validate(text=text, text_mask=text_mask, text_pooled=text_pooled,
                                           cond_images=cond_images, cond_available=cond_available))

    def encode(self, *, text: Tensor | None, text_mask: Tensor | None, text_pooled: Tensor | None,
               cond_images: Tensor | None, cond_available: Tensor | None,
               checkpoint_blocks: bool = False) -> EncodedConditions:
        """Encode conditions that `validate` returned.

        `checkpoint_blocks=True` runs each full-size block (those of the image encoder, the gates)
        under `torch.utils.checkpoint`; see `encode_checkpointed`.
        """
        batch = (text if text is not None else cond_images).shape[0]
        cond = self.spec.conditioning
        features, image_present = None, None
        if cond.has_images:
            features = self.image_encoder(cond_images, cond_available, checkpoint_blocks=checkpoint_blocks)
            image_present = cond_available.any(dim=1)
        tokens = token_mask = pooled = text_present = None
        if cond.has_text:
            text_present = text_mask.any(dim=1)
            if text_pooled is None:  # masked mean of the tokens; rows without text get the null vector
                weights = text_mask.to(text.dtype)[:, :, None]
                text_pooled = (text * weights).sum(1) / weights.sum(1).clamp_min(1)
            pooled = torch.where(text_present[:, None], text_pooled, self.null_text_pooled.to(text.dtype))
            nulls = self.null_text_tokens.to(text.dtype).expand(batch, -1, -1)
            tokens = torch.cat([text, nulls], dim=1)  # null tokens always present, masked in when text is absent
            token_mask = torch.cat([text_mask, (~text_present)[:, None].expand(-1, nulls.shape[1])], dim=1)

        maps, context, context_mask = {}, {}, {}
        for key, (kind, _) in self.sites.items():
            level_features = None if features is None else features[self.feature_index[key]]
            if kind is FusionKind.CROSS_ATTENTION:
                parts, masks = [tokens], [token_mask]
                if level_features is not None:
                    pooled_grid = F.adaptive_avg_pool3d(level_features, cond.pooled_image_tokens)
                    image_tokens = self.image_tokens[key](rearrange(pooled_grid, "b c d h w -> b (d h w) c"))
                    parts.append(image_tokens)
                    masks.append(image_present[:, None].expand(-1, image_tokens.shape[1]))
                context[key], context_mask[key] = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
            elif key in self.gated and checkpoint_blocks and torch.is_grad_enabled():
                maps[key] = checkpoint(self.gated[key], pooled, level_features, text_present, image_present,
                                       use_reentrant=False)
            elif key in self.gated:
                maps[key] = self.gated[key](pooled, level_features, text_present, image_present)
            elif key in self.text_maps:
                maps[key] = self.text_maps[key](pooled)[:, :, None, None, None]
            else:
                maps[key] = level_features
        modulation = None if self.timestep_modulation is None else self.timestep_modulation(pooled)
        image_size = None if cond_images is None else tuple(cond_images.shape[2:])
        return EncodedConditions(batch_size=batch, image_size=image_size, maps=maps, context=context,
                                 context_mask=context_mask, timestep_scale_shift=modulation)


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _given(**arguments: Tensor | None) -> list[str]:
    return [name for name, value in arguments.items() if value is not None]


def checked_tensor(name: str, value, *, rank: int, floating: bool, layout_text: str) -> Tensor:
    """`value` itself if it is a tensor of `rank` dimensions, floating-point or bool as asked; else an `InputError`."""
    if not isinstance(value, Tensor):
        raise InputError(f"{name}: expected a torch.Tensor of shape {layout_text}, got {type(value).__name__}. "
                         "Convert it with torch.as_tensor(...).")
    if value.ndim != rank:
        raise InputError(f"{name}: expected {rank} dimensions {layout_text}, got {value.ndim} with shape "
                         f"{tuple(value.shape)}. Pass a tensor of shape {layout_text}.")
    if floating and not value.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got {value.dtype}. Convert it with .float().")
    if not floating and value.dtype != torch.bool:
        raise InputError(f"{name}: expected a bool tensor (True = present), got {value.dtype}. Convert it with .bool().")
    return value


def _refuse_unused(spec: UNetSpec, given: list[str]) -> None:
    """A condition the spec has no use for is a mistake (a silently ignored input is worse)."""
    cond = spec.conditioning
    for name in given:
        if cond is None:
            reason = "has no conditioning (UNetSpec.conditioning is None)"
        elif name.startswith("text") and not cond.has_text:
            reason = "does not condition on text (conditioning.text_channels=None)"
        elif name.startswith("cond_") and not cond.has_images:
            reason = "does not condition on images (conditioning.image_channels=0)"
        else:
            continue
        raise InputError(f"{name}: expected None because this UNet's spec {reason}, got a value. Drop {name}, or build the UNet from a "
                         "spec that uses it (e.g. UNetSpec.conditioned(...)).")


def validate_conditions(spec: UNetSpec, *, text, text_mask, text_pooled, cond_images, cond_available):
    """Check every condition against the spec and each other; return (batch, text_mask, cond_available).

    Raises [`InputError`][cpcbm_blocks.errors.InputError] before any compute, naming the argument,
    the expected and the actual value, and what to do. Missing masks default to "all present".
    """
    cond = spec.conditioning
    _refuse_unused(spec, _given(text=text, text_mask=text_mask, text_pooled=text_pooled, cond_images=cond_images,
                                cond_available=cond_available))
    if cond is None:
        return None, None, None
    batches: dict[str, int] = {}
    if cond.has_text:
        if text is None:
            raise InputError(f"text: expected token embeddings (B, L, {cond.text_channels}) because this spec conditions "
                             f"on text (conditioning.text_channels={cond.text_channels}), got None. Pass them; mark a "
                             "sample's text as absent with an all-False text_mask row.")
        checked_tensor("text", text, rank=3, floating=True, layout_text="(batch, tokens, text_channels)")
        if text.shape[2] != cond.text_channels:
            raise InputError(f"text: expected token width {cond.text_channels} (conditioning.text_channels), got "
                             f"{text.shape[2]} in shape {tuple(text.shape)}. Use the encoder the spec was built for, "
                             "or set ConditioningSpec(text_channels=...).")
        if text.shape[1] < 1:
            raise InputError(f"text: expected at least one token, got shape {tuple(text.shape)}. Mark absent text "
                             "with an all-False text_mask row instead of an empty sequence.")
        batches["text"] = text.shape[0]
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        checked_tensor("text_mask", text_mask, rank=2, floating=False, layout_text="(batch, tokens)")
        if tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise InputError(f"text_mask: expected shape {tuple(text.shape[:2])} (batch, tokens of text), got "
                             f"{tuple(text_mask.shape)}. Give one entry per token of text (True = real token).")
        if text_pooled is not None:
            checked_tensor("text_pooled", text_pooled, rank=2, floating=True, layout_text="(batch, text_channels)")
            if tuple(text_pooled.shape) != (text.shape[0], cond.text_channels):
                raise InputError(f"text_pooled: expected shape {(text.shape[0], cond.text_channels)}, got "
                                 f"{tuple(text_pooled.shape)}. Pass the text encoder's pooled vector, or leave it None "
                                 "for the masked mean of the tokens.")
    if cond.has_images:
        if cond_images is None:
            raise InputError(f"cond_images: expected (B, {cond.image_channels}, D, H, W) images because this spec "
                             f"conditions on {cond.image_channels} image(s) (conditioning.image_channels), got None. "
                             "Pass them; mark absent ones with cond_available=False (zeros are a legitimate image).")
        checked_tensor("cond_images", cond_images, rank=5, floating=True, layout_text="(batch, k, depth, height, width)")
        if cond_images.shape[1] != cond.image_channels:
            raise InputError(f"cond_images: expected {cond.image_channels} conditional image(s) on axis 1 "
                             f"(conditioning.image_channels), got {cond_images.shape[1]} in shape "
                             f"{tuple(cond_images.shape)}.")
        check_input_shape(spec, cond_images.shape, name="cond_images", channels=cond.image_channels)
        batches["cond_images"] = cond_images.shape[0]
        if cond_available is None:
            cond_available = torch.ones(cond_images.shape[:2], dtype=torch.bool, device=cond_images.device)
        checked_tensor("cond_available", cond_available, rank=2, floating=False, layout_text="(batch, k)")
        if tuple(cond_available.shape) != tuple(cond_images.shape[:2]):
            raise InputError(f"cond_available: expected shape {tuple(cond_images.shape[:2])} (batch, k of cond_images), "
                             f"got {tuple(cond_available.shape)}. Give one flag per conditional image (True = present).")
    if len(set(batches.values())) > 1:
        raise InputError(f"text, cond_images: expected the same batch size, got {batches}. Give every condition one "
                         "row per sample.")
    return next(iter(batches.values())), text_mask, cond_available
