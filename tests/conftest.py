"""Shared fixtures, hypothesis profiles and strategies.

Profiles: `ci` (default; few examples, keeps the suite fast on 2 cores), `dev`, and `thorough`
(500 examples). Pick one with `HYPOTHESIS_PROFILE=thorough pytest ...`.
"""

import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cpcbm_blocks import LevelSpec, MidSpec, TimestepInjection, UNetSpec

ROOT = Path(__file__).resolve().parents[1]

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Test tensors are tiny: a second thread buys nothing, and on a loaded machine OpenMP's spin-waiting
# makes 2 threads several times slower than 1 (measured: 1.4 s vs 0.17 s per conditioned step).
torch.set_num_threads(1)


def seed_trace_text() -> str:
    """The seed's `h:` trace, verbatim, from the docs page that keeps it."""
    page = (ROOT / "docs" / "architecture" / "seed-trace.md").read_text()
    return re.search(r"```text\n(.*?)```", page, re.S).group(1)


def randomize_(module: torch.nn.Module, *, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with small random values (undoing zero-init), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


@st.composite
def unet_specs(draw, *, max_levels: int = 5, max_channels_per_group: int = 2):
    """Random valid specs: 1-5 levels, channels multiple of the groups, 1-3 res blocks, per-level
    strides and kernels, attention levels, 1-2 middle segments."""
    num_groups = draw(st.sampled_from([1, 2, 4]))
    head_channels = draw(st.sampled_from([2, 4]))
    unit = num_groups * head_channels
    n_levels = draw(st.integers(1, max_levels))
    levels = []
    for _ in range(n_levels):
        levels.append(LevelSpec(
            channels=unit * draw(st.integers(1, max_channels_per_group)),
            num_res_blocks=draw(st.integers(1, 3)),
            attention=draw(st.booleans()),
            stride=draw(st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2]))),
            kernel_size=draw(st.sampled_from([(3, 3, 3), (1, 3, 3), (1, 1, 1)])),
        ))
    mid = MidSpec(num_segments=draw(st.integers(1, 2)), share_weights=draw(st.booleans()),
                  attention=draw(st.booleans()), kernel_size=draw(st.sampled_from([(3, 3, 3), (1, 3, 3)])))
    return UNetSpec(levels=tuple(levels), mid=mid, in_channels=draw(st.integers(1, 3)),
                    out_channels=draw(st.integers(1, 3)), num_groups=num_groups, head_channels=head_channels,
                    time_embedding_channels=draw(st.sampled_from([8, 16])),
                    timestep_injection=draw(st.sampled_from(list(TimestepInjection))),
                    upcast_attention=draw(st.booleans()))


@st.composite
def valid_input_shapes(draw, spec: UNetSpec, *, max_multiple: int = 2):
    """An input shape the spec accepts: every spatial axis a small multiple of its stride product."""
    batch = draw(st.integers(1, 2))
    spatial = [m * draw(st.integers(1, max_multiple)) for m in spec.stride_product]
    return (batch, spec.in_channels, *spatial)


@pytest.fixture
def tiny_spec() -> UNetSpec:
    """A 2-level spec small enough for real CPU forward and backward passes in a test."""
    return UNetSpec(levels=(LevelSpec(channels=8, stride=(2, 2, 2)),
                            LevelSpec(channels=16, attention=True, stride=(1, 2, 2), kernel_size=(1, 3, 3))),
                    mid=MidSpec(kernel_size=(1, 3, 3)), num_groups=4, head_channels=4, time_embedding_channels=16)


@pytest.fixture
def one_weight_gradient_form(monkeypatch):
    """oneDNN's 3-D weight gradient everywhere: what a backward holds then does not depend on which form an
    earlier test measured fastest (`set_weight_grad_method("auto")` times them once per problem)."""
    from cpcbm_blocks.blocks import conv_weight_grad

    monkeypatch.setattr(conv_weight_grad, "_weight_grad_method", "aten")
