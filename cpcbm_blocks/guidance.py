"""Classifier-free guidance with two conditions: condition dropout for training, guidance for sampling.

Training drops conditions at random so one network learns the unconditional, image-only and
image-and-text predictions; sampling combines the three (Brooks et al. 2023, InstructPix2Pix):

$$ \\hat\\epsilon = \\epsilon(\\varnothing, \\varnothing) + s_I\\,(\\epsilon(I, \\varnothing) - \\epsilon(\\varnothing, \\varnothing))
   + s_T\\,(\\epsilon(I, T) - \\epsilon(I, \\varnothing)) $$

Dropping uses the library's explicit absence: a dropped text is an all-False `text_mask` row, a
dropped image a False `cond_available` flag. No tensor changes shape.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from cpcbm_blocks.conditioning import EncodedConditions
from cpcbm_blocks.errors import InputError

__all__ = ["ConditionDropout", "guidance_conditions", "guided_prediction"]


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InputError(f"{name}: expected a probability in [0, 1], got {value!r}.")
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
                             f"{self.p_text + self.p_images_all + self.p_both:.3f}. They are exclusive outcomes of one draw.")

    def __call__(self, text_mask: Tensor | None, cond_available: Tensor | None, *,
                 generator: torch.Generator | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Return copies of `text_mask` (B, L) and `cond_available` (B, k) with the drops applied."""
        reference = text_mask if text_mask is not None else cond_available
        if reference is None:
            raise InputError("text_mask, cond_available: expected at least one of them, got None for both.")
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


def guidance_conditions(model, *, text: Tensor | None = None, text_mask: Tensor | None = None,
                        text_pooled: Tensor | None = None, cond_images: Tensor | None = None,
                        cond_available: Tensor | None = None) -> EncodedConditions:
    """Encode the three guidance branches once, stacked along the batch: (∅, ∅), (I, ∅), (I, T).

    Pass the result to [`guided_prediction`][cpcbm_blocks.guidance.guided_prediction] at every
    sampling step; the encoding is not repeated.
    """
    cond = model.spec.conditioning
    if cond is None:
        raise InputError("model: expected a conditioned UNet for guidance, got one whose spec.conditioning is None.")

    def three(value: Tensor | None) -> Tensor | None:
        return None if value is None else torch.cat([value, value, value])

    if cond.has_text and text is not None and text_mask is None:
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    if cond.has_images and cond_images is not None and cond_available is None:
        cond_available = torch.ones(cond_images.shape[:2], dtype=torch.bool, device=cond_images.device)
    if text_mask is not None:
        none = torch.zeros_like(text_mask)
        text_mask = torch.cat([none, none, text_mask])
    if cond_available is not None:
        cond_available = torch.cat([torch.zeros_like(cond_available), cond_available, cond_available])
    encoded = model.encode_conditions(text=three(text), text_mask=text_mask, text_pooled=three(text_pooled),
                                      cond_images=three(cond_images), cond_available=cond_available)
    return encoded


def guided_prediction(model, x: Tensor, t, conditions: EncodedConditions, *, image_scale: float,
                      text_scale: float) -> Tensor:
    """One batched call of `model` on the three branches of `conditions`, combined by the scales.

    With `image_scale = text_scale = 1` this is the fully conditioned prediction; with both 0 the
    unconditional one.
    """
    batch = x.shape[0]
    if conditions.batch_size != 3 * batch:
        raise InputError(f"conditions: expected the three guidance branches for {batch} sample(s) "
                         f"(batch {3 * batch}, from guidance_conditions), got batch {conditions.batch_size}.")
    if isinstance(t, Tensor) and t.ndim == 1:
        t = torch.cat([t, t, t])
    null, image, both = model(torch.cat([x, x, x]), t, conditions=conditions).chunk(3)
    return null + image_scale * (image - null) + text_scale * (both - image)
