"""Classifier-free guidance with two conditions: condition dropout for training, guidance for sampling.

Training drops conditions at random so one network learns the unconditional, image-only and
image-and-text predictions; sampling combines the three (Brooks et al. 2023, InstructPix2Pix):

$$ \\hat\\epsilon = \\epsilon(\\varnothing, \\varnothing) + s_I\\,(\\epsilon(I, \\varnothing) - \\epsilon(\\varnothing, \\varnothing))
   + s_T\\,(\\epsilon(I, T) - \\epsilon(I, \\varnothing)) $$

Dropping uses the library's explicit absence: a dropped text is an all-False `text_mask` row, a
dropped image a False `cond_available` flag. No tensor changes shape.
"""

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cpcbm_blocks.blocks.embedding import timesteps_to_batch
from cpcbm_blocks.conditioning import EncodedConditions, checked_tensor
from cpcbm_blocks.errors import InputError
from cpcbm_blocks.spec import UNetSpec
from cpcbm_blocks.unet import UNet3D, check_volume

__all__ = ["ConditionDropout", "guidance_conditions", "guided_prediction"]


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InputError(f"{name}: expected a probability in [0, 1], got {value!r}. Pass a number between 0 and 1.")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class ConditionDropout:
    """Randomly marks conditions absent during training (classifier-free guidance, ModDrop).

    One uniform draw per sample decides the joint drops, so the branches guidance needs are seen at
    known rates: with probability `p_both` both text and all images are dropped, with `p_text` only
    the text, with `p_images_all` only the images. Independently of that, each remaining image is
    dropped with `p_image_each`, which teaches robustness to a missing sequence.

    ```python
    dropout = ConditionDropout(p_text=0.05, p_images_all=0.05, p_both=0.05, p_image_each=0.1)
    text_mask, cond_available = dropout(text_mask, cond_available)
    ```
    """

    p_text: float = 0.05
    p_images_all: float = 0.05
    p_both: float = 0.05
    p_image_each: float = 0.0

    def __post_init__(self) -> None:
        for name in ("p_text", "p_images_all", "p_both", "p_image_each"):
            _probability(f"ConditionDropout.{name}", getattr(self, name))
        if self.p_text + self.p_images_all + self.p_both > 1:
            raise InputError(f"ConditionDropout: expected p_text + p_images_all + p_both <= 1, got "
                             f"{self.p_text + self.p_images_all + self.p_both:.3f}. They are exclusive outcomes of one draw: lower them.")

    def __call__(self, text_mask: Tensor | None, cond_available: Tensor | None, *,
                 generator: torch.Generator | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Return copies of `text_mask` (B, L) and `cond_available` (B, k) with the drops applied.

        Both must be 2-D bool tensors with the same batch size on one device (a single row is not
        broadcast to the other's batch); [`InputError`][cpcbm_blocks.errors.InputError] otherwise.
        """
        _check_masks(text_mask, cond_available)
        reference = text_mask if text_mask is not None else cond_available
        batch, device = reference.shape[0], reference.device
        u = torch.rand(batch, generator=generator, device="cpu").to(device)
        drop_text = u < self.p_both + self.p_text
        drop_images = (u < self.p_both) | ((u >= self.p_both + self.p_text) &
                                            (u < self.p_both + self.p_text + self.p_images_all))
        if text_mask is not None:
            text_mask = text_mask & ~drop_text[:, None]
        if cond_available is not None:
            each = torch.rand(cond_available.shape, generator=generator, device="cpu").to(device) < self.p_image_each
            cond_available = cond_available & ~drop_images[:, None] & ~each
        return text_mask, cond_available


def _check_masks(text_mask, cond_available) -> None:
    """Both masks 2-D bool, one row per sample of the same batch, on one device: no silent broadcast."""
    if text_mask is None and cond_available is None:
        raise InputError("text_mask, cond_available: expected at least one of them, got None for both. Pass the "
                         "batch's text_mask (B, L) and/or cond_available (B, k).")
    if text_mask is not None:
        checked_tensor("text_mask", text_mask, rank=2, floating=False, layout_text="(batch, tokens)")
    if cond_available is not None:
        checked_tensor("cond_available", cond_available, rank=2, floating=False, layout_text="(batch, k)")
    if text_mask is None or cond_available is None:
        return
    if text_mask.shape[0] != cond_available.shape[0]:
        raise InputError(f"text_mask, cond_available: expected the same batch size, got text_mask of shape "
                         f"{tuple(text_mask.shape)} and cond_available of shape {tuple(cond_available.shape)}. Give both "
                         "one row per sample (a single row is not broadcast: each sample gets its own draw).")
    if text_mask.device != cond_available.device:
        raise InputError(f"cond_available: expected a tensor on text_mask's device {text_mask.device}, got one on "
                         f"{cond_available.device}. Move it with cond_available.to(text_mask.device).")


def _conditioned_unet(model, *, where: str) -> UNet3D:
    """`model` itself, or the UNet3D inside torch.compile / (Distributed)DataParallel; refused unless conditioned."""
    unet = model
    for _ in range(3):  # torch.compile(DistributedDataParallel(model)) is two wrappers deep
        inner = getattr(unet, "_orig_mod", None) if isinstance(unet, nn.Module) else None
        if inner is None and isinstance(unet, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = unet.module
        if inner is None:
            break
        unet = inner
    if not isinstance(unet, UNet3D):
        hint = (" Pass the model built from it, UNet3D(spec), not the spec." if isinstance(unet, UNetSpec) else
                " Pass the model built with UNet3D(UNetSpec.conditioned(...)).")
        raise InputError(f"{where}: model: expected a conditioned UNet3D, got {type(model).__name__}.{hint}")
    if unet.conditioner is None:
        raise InputError(f"{where}: model: expected a conditioned UNet for guidance, got one whose spec.conditioning is "
                         "None. Build it from UNetSpec.conditioned(...).")
    return unet


def _scale(name: str, value, *, batch: int, x: Tensor) -> float | Tensor:
    """A guidance scale: a number, a 0-d tensor, or one per sample `(B,)`, returned as `(B, 1, 1, 1, 1)`."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise InputError(f"{name}: expected a number, a 0-d tensor or a ({batch},) tensor of per-sample scales, got "
                         f"{type(value).__name__}. Pass e.g. {name}=7.5 or torch.full(({batch},), 7.5).")
    if not isinstance(value, Tensor):
        if not math.isfinite(value):
            raise InputError(f"{name}: expected a finite number, got {value!r}. Pass e.g. {name}=7.5.")
        return float(value)
    if value.dtype == torch.bool or value.is_complex():
        raise InputError(f"{name}: expected a real (integer or floating-point) tensor, got {value.dtype}. "
                         f"Convert it with {name}.float().")
    if value.ndim == 0 and (value.device == x.device or value.device.type == "cpu"):
        return value
    if value.ndim == 0:
        raise InputError(f"{name}: expected a tensor on x's device {x.device} (or the CPU), got one on {value.device}. "
                         f"Move it with {name}.to(x.device).")
    if tuple(value.shape) != (batch,):
        raise InputError(f"{name}: expected a number, a 0-d tensor or shape ({batch},) (one scale per sample of x), got "
                         f"shape {tuple(value.shape)}. Pass one scale per sample, or a single number for the batch.")
    if value.device != x.device:
        raise InputError(f"{name}: expected a tensor on x's device {x.device}, got one on {value.device}. "
                         f"Move it with {name}.to(x.device).")
    return value.reshape(batch, 1, 1, 1, 1)


def guidance_conditions(model, *, text: Tensor | None = None, text_mask: Tensor | None = None,
                        text_pooled: Tensor | None = None, cond_images: Tensor | None = None,
                        cond_available: Tensor | None = None) -> EncodedConditions:
    """Encode the three guidance branches once, stacked along the batch: (∅, ∅), (I, ∅), (I, T).

    Pass the result to [`guided_prediction`][cpcbm_blocks.guidance.guided_prediction] at every
    sampling step; the encoding is not repeated.
    """
    unet = _conditioned_unet(model, where="guidance_conditions")
    # validated (types, shapes, batch, dtype, device) before anything is tripled, so errors report the real values
    raw = unet.conditioner.validate(text=text, text_mask=text_mask, text_pooled=text_pooled, cond_images=cond_images,
                                    cond_available=cond_available)
    text, text_mask, text_pooled = raw["text"], raw["text_mask"], raw["text_pooled"]
    cond_images, cond_available = raw["cond_images"], raw["cond_available"]

    def three(value: Tensor | None) -> Tensor | None:
        return None if value is None else torch.cat([value, value, value])

    if text_mask is not None:
        none = torch.zeros_like(text_mask)
        text_mask = torch.cat([none, none, text_mask])
    if cond_available is not None:
        cond_available = torch.cat([torch.zeros_like(cond_available), cond_available, cond_available])
    encoded = unet.encode_conditions(text=three(text), text_mask=text_mask, text_pooled=three(text_pooled),
                                      cond_images=three(cond_images), cond_available=cond_available)
    return encoded


def guided_prediction(model, x: Tensor, t, conditions: EncodedConditions, *, image_scale: float | Tensor,
                      text_scale: float | Tensor) -> Tensor:
    """One batched call of `model` on the three branches of `conditions`, combined by the scales.

    With `image_scale = text_scale = 1` this is the fully conditioned prediction; with both 0 the
    unconditional one. Each scale is a number, a 0-d tensor, or a `(B,)` tensor with one scale per
    sample of `x`. `x`, `t` and the scales are validated before the batch is tripled
    ([`InputError`][cpcbm_blocks.errors.InputError]), so messages report the shapes passed in.
    """
    unet = _conditioned_unet(model, where="guided_prediction")
    if not isinstance(conditions, EncodedConditions):
        raise InputError(f"conditions: expected the EncodedConditions of guidance_conditions(model, ...), got "
                         f"{type(conditions).__name__}. Encode the three branches once with guidance_conditions(model, ...) "
                         "and pass them at every step.")
    # x and t are checked here, before they are tripled, so that errors report the caller's shapes
    check_volume(x, unet.spec, like=unet.time_embedding.mlp[0].weight)
    batch = x.shape[0]
    if conditions.batch_size != 3 * batch:
        raise InputError(f"conditions: expected the three guidance branches for {batch} sample(s) "
                         f"(batch {3 * batch}, from guidance_conditions), got batch {conditions.batch_size}. "
                         f"Encode them with guidance_conditions(model, ...) from the conditions of these {batch} sample(s).")
    t = timesteps_to_batch(t, batch_size=batch, device=x.device)
    scales = {name: _scale(name, value, batch=batch, x=x)
              for name, value in (("image_scale", image_scale), ("text_scale", text_scale))}
    null, image, both = model(torch.cat([x, x, x]), torch.cat([t, t, t]), conditions=conditions).chunk(3)
    image_scale, text_scale = (s.to(null.dtype) if isinstance(s, Tensor) else s for s in scales.values())
    return null + image_scale * (image - null) + text_scale * (both - image)
