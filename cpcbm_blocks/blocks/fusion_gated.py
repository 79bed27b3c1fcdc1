"""Gated fusion: `GatedFusion3D` fuses text with image features; `GatedInjection3D` adds a condition.

Both are gates. The first is a gated multimodal unit (GMU) that decides, per voxel and channel, how
much of the condition comes from the text and how much from the conditional images. The second is
the zero-initialised tanh gate (Flamingo, GLIGEN) through which a condition map enters the network.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from cpcbm_blocks.arguments import check_counts
from cpcbm_blocks.blocks.conv import Conv3d
from cpcbm_blocks.blocks.gated_residual import gated_residual
from cpcbm_blocks.contracts import shape_checked

__all__ = ["GatedFusion3D", "GatedInjection3D"]


class GatedFusion3D(nn.Module):
    """Gated multimodal unit over a text vector and an image feature map, with null vectors.

    $$ z = \\sigma(W_t t + W_i * i + b),\\qquad y = z \\odot \\tilde t + (1 - z) \\odot i,\\qquad
       \\tilde t = P t \\ \\text{broadcast over}\\ d h w $$

    `W_i *` is a 1x1x1 convolution; together `W_t t + W_i * i` is a 1x1x1 convolution over the
    concatenation `[t̃; i]`, computed without materialising the broadcast text. The gate lies in
    [0, 1]: at `z = 1` the output is the (projected) text, at `z = 0` the image features. There is no
    alignment step before the gate (the seed's notes; the original OT "alignment" was removed).

    A sample without text uses a learned null text vector, a sample without any conditional image a
    learned null image vector, so an absent modality is a value the network learns to read, not a
    zero it cannot tell apart from a real all-zero mask.

    ??? cite "Arevalo et al. 2017, Gated Multimodal Units for Information Fusion"

    **Arguments:**

    - `channels`: channels of the image features and of the output.
    - `text_channels`: width of the pooled text vector.
    """

    def __init__(self, *, channels: int, text_channels: int) -> None:
        super().__init__()
        check_counts("GatedFusion3D", channels=channels, text_channels=text_channels)
        self.channels = channels
        self.text_channels = text_channels
        self.text_proj = nn.Linear(text_channels, channels)
        self.gate_text = nn.Linear(text_channels, channels)
        self.gate_image = Conv3d(channels, channels, kernel_size=(1, 1, 1), bias=False)
        self.null_text = nn.Parameter(torch.zeros(text_channels))
        self.null_image = nn.Parameter(torch.zeros(channels))

    def _substitute_nulls(self, text: Tensor, image: Tensor, text_present: Tensor, image_present: Tensor):
        text = torch.where(text_present[:, None], text, self.null_text.to(text.dtype))
        image = torch.where(image_present[:, None, None, None, None], image,
                            self.null_image.to(image.dtype)[None, :, None, None, None])
        return text, image

    @shape_checked
    def gate(self, text: Float[Tensor, "b {self.text_channels}"], image: Float[Tensor, "b {self.channels} d h w"]
             ) -> Float[Tensor, "b {self.channels} d h w"]:
        """The gate `z` in [0, 1] (how much of the output is text), for present inputs."""
        return torch.sigmoid(self.gate_text(text)[:, :, None, None, None] + self.gate_image(image))

    @shape_checked
    def forward(self, text: Float[Tensor, "b {self.text_channels}"], image: Float[Tensor, "b {self.channels} d h w"],
                text_present: Bool[Tensor, " b"], image_present: Bool[Tensor, " b"]
                ) -> Float[Tensor, "b {self.channels} d h w"]:
        text, image = self._substitute_nulls(text, image, text_present, image_present)
        z = self.gate(text, image)
        return z * self.text_proj(text)[:, :, None, None, None] + (1 - z) * image


class GatedInjection3D(nn.Module):
    """Adds a condition map to the network's features through a zero-initialised tanh gate.

    $$ y = x + \\tanh(g) \\odot W c,\\qquad g = 0\\ \\text{at init} $$

    with `W` a 1x1x1 convolution and `g` one gate per channel, so a fresh block is the identity and
    learns how much condition to let in (the Flamingo / GLIGEN gated residual).

    ??? cite "Alayrac et al. 2022 (Flamingo); Li et al. 2023 (GLIGEN)"

    **Arguments:**

    - `channels`: channels of the network features and of the condition map.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        check_counts("GatedInjection3D", channels=channels)
        self.channels = channels
        self.proj = Conv3d(channels, channels, kernel_size=(1, 1, 1))
        self.gate = nn.Parameter(torch.zeros(channels))

    @shape_checked
    def forward(self, x: Float[Tensor, "b {self.channels} d h w"], condition: Float[Tensor, "b {self.channels} d h w"]
                ) -> Float[Tensor, "b {self.channels} d h w"]:
        return gated_residual(x, self.gate, self.proj(condition))
