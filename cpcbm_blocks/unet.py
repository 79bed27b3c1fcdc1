"""`UNet3D`: the documented diffusion UNet, run step by step with every transition asserted."""

from pathlib import Path

import torch
from jaxtyping import Float, Real
from torch import Tensor, nn

from cpcbm_blocks import checkpoint
from cpcbm_blocks.blocks.embedding import TimestepEmbedding, timesteps_to_batch
from cpcbm_blocks.build import build_blocks
from cpcbm_blocks.contracts import checks_active
from cpcbm_blocks.errors import InputError, TraceMismatchError
from cpcbm_blocks.layout import Op, layout
from cpcbm_blocks.plan import Plan, Transition, check_input_shape, plan
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
        self._trace_sink: list[Transition] | None = None

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

    def forward(self, x: Float[Tensor, "b c_in d h w"],
                t: int | float | Real[Tensor, ""] | Real[Tensor, " b"]) -> Float[Tensor, "b c_out d h w"]:
        """Predict from the noisy volume `x` at diffusion time `t`.

        `c_in` is `spec.in_channels` and `c_out` is `spec.out_channels`; D, H and W must be multiples
        of `spec.stride_product`. The arguments are validated explicitly (with messages that say
        what to do) and every transition is checked against the plan, which covers the return.
        """
        checking = checks_active()
        expected = None
        if not torch.compiler.is_compiling():
            _check_volume(x, self.spec, like=self.time_embedding.mlp[0].weight)
            t = timesteps_to_batch(t, batch_size=x.shape[0], device=x.device)
            planned = plan(self.spec, tuple(x.shape)).transitions  # also validates the shape against the spec
            if checking or self._trace_sink is not None:
                expected = planned
        emb = self.time_embedding(t, batch_size=x.shape[0])

        h, skips = x, []
        for position, step in enumerate(self.steps):
            block = self.blocks[step.module_key]
            skip = skips.pop() if step.takes_skip else None
            h_in = h
            if skip is not None:
                h = torch.cat([h, skip], dim=1)
            h = block(h, emb) if step.op is Op.RES else block(h)
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


def _check_volume(x: Tensor, spec: UNetSpec, *, like: Tensor) -> None:
    """Validate `x` against the spec and against the model's weights (`like`): type, dtype, device, shape."""
    if not isinstance(x, Tensor):
        raise InputError(f"x: expected a torch.Tensor of shape (batch, {spec.in_channels}, depth, height, width), "
                         f"got {type(x).__name__}. Convert it with torch.as_tensor(...).")
    if not x.is_floating_point():
        raise InputError(f"x: expected a floating-point tensor (float32, bfloat16 or float16), got {x.dtype}. "
                         "Convert it with x.float().")
    if x.device != like.device:
        raise InputError(f"x: expected a tensor on the model's device {like.device}, got one on {x.device}. "
                         f"Move it with x.to({str(like.device)!r}), or the model with model.to(x.device).")
    allowed = {like.dtype}
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        allowed |= {torch.float32, torch.get_autocast_dtype(x.device.type)}
    if x.dtype not in allowed:
        raise InputError(f"x: expected dtype {' or '.join(sorted(str(d) for d in allowed))} (the model's weights"
                         f"{' or the autocast dtype' if len(allowed) > 1 else ''}), got {x.dtype}. Convert it with "
                         f"x.to({like.dtype}), cast the model with model.to({x.dtype}), or run under torch.autocast.")
    check_input_shape(spec, x.shape, name="x")
