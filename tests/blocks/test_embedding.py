import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import InputError, ShapeContractError, TimestepEmbedding
from cpcbm_blocks.blocks.embedding import sinusoidal_embedding, timesteps_to_batch


@pytest.fixture
def embedding():
    torch.manual_seed(0)
    return TimestepEmbedding(channels=16, out_channels=32)


@pytest.mark.parametrize("t", [500, 500.0, torch.tensor(500), torch.tensor(500.0), torch.tensor(500, dtype=torch.int32)])
def test_scalars_of_every_kind_are_broadcast_to_the_batch(embedding, t):
    out = embedding(t, batch_size=3)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, embedding(torch.full((3,), 500.0)))


def test_a_batch_of_integer_or_float_timesteps_gives_the_same_embedding(embedding):
    torch.testing.assert_close(embedding(torch.tensor([1, 999])), embedding(torch.tensor([1.0, 999.0])))


def test_float_timesteps_are_never_truncated(embedding):
    half = embedding(0.5, batch_size=1)
    assert not torch.allclose(half, embedding(0, batch_size=1))
    assert not torch.allclose(half, embedding(1, batch_size=1))
    torch.testing.assert_close(half, embedding(torch.tensor([0.5])))


def test_sinusoidal_features_match_the_formula():
    t = torch.tensor([0.0, 3.0])
    features = sinusoidal_embedding(t, 8)
    frequencies = [10_000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in frequencies] + [math.sin(v * f) for f in frequencies] for v in (0.0, 3.0)]
    torch.testing.assert_close(features, torch.tensor(expected))


@given(batch=st.integers(1, 5), channels=st.sampled_from([4, 7, 16]), out_channels=st.integers(1, 24))
def test_shapes_under_hypothesis(batch, channels, out_channels):
    emb = TimestepEmbedding(channels=channels, out_channels=out_channels)
    assert emb(torch.rand(batch) * 1000).shape == (batch, out_channels)


@pytest.mark.parametrize(("t", "batch_size", "fragments"), [
    (torch.zeros(2), 3, ["t: expected shape () or (3,)", "got (2,)"]),
    (torch.tensor([True, False]), 2, ["t: expected an integer or floating-point tensor", "torch.bool"]),
    (True, 1, ["t: expected a number", "got bool"]),
    ("500", 1, ["t: expected a number", "got str"]),
    (torch.tensor([1.0, float("nan")]), 2, ["t: expected finite, non-negative timesteps", "nan"]),
    (-1, 1, ["t: expected finite, non-negative timesteps", "got -1"]),
])
def test_bad_timesteps_are_rejected_with_a_clear_message(t, batch_size, fragments):
    """`timesteps_to_batch` is the validation that UNet3D runs on `t` before any compute."""
    with pytest.raises(InputError) as caught:
        timesteps_to_batch(t, batch_size=batch_size, device=torch.device("cpu"))
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("t", "actual"), [(torch.zeros(3, 1), "f32[3,1]"), (torch.ones(3, dtype=torch.bool), "bool[3]")])
def test_a_timestep_tensor_of_the_wrong_rank_or_dtype_violates_the_embeddings_contract(embedding, t, actual):
    with pytest.raises(ShapeContractError) as caught:
        embedding(t, batch_size=3)
    assert "parameter 't'" in str(caught.value) and actual in str(caught.value)


def test_gradient_reaches_every_parameter(embedding):
    embedding(torch.tensor([10.0, 20.0])).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embedding.parameters())
