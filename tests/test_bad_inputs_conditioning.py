"""Bad inputs to condition dropout, encoded conditions, guidance and checkpoint loading get our errors.

Each test asserts the error type and that the message names the argument (and, where it matters, the
actual value passed in), never a crash inside torch or a silent broadcast.
"""

import dataclasses

import numpy as np
import pytest
import torch

from cpcbm_blocks import (
    CheckpointError,
    ConditionDropout,
    ConditioningSpec,
    InputError,
    UNet3D,
    UNetSpec,
    guidance_conditions,
    guided_prediction,
)
from cpcbm_blocks.checkpoint import WEIGHTS_FILE, from_pretrained, save_pretrained

from .conftest import randomize_

E = 12  # text width
X_SHAPE = (2, 1, 4, 16, 16)


def _spec(*, text_channels=E, image_channels=2, **arguments) -> UNetSpec:
    base = {"sample_size": (4, 16, 16), "channels": (8, 16), "num_groups": 4, "head_channels": 4,
            "time_embedding_channels": 16}
    conditioning = ConditioningSpec(text_channels=text_channels, image_channels=image_channels,
                                    text_to_timestep=arguments.pop("text_to_timestep", False))
    return UNetSpec.conditioned(**{**base, **arguments}, conditioning=conditioning)


def _raw(batch=2, *, text=True, images=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = {}
    if text:
        raw["text"] = torch.randn(batch, 5, E, generator=g)
    if images:
        raw["cond_images"] = torch.randn(batch, 2, 4, 16, 16, generator=g)
    return raw


@pytest.fixture(scope="module")
def model():
    return randomize_(UNet3D(_spec()), scale=0.05).eval()


def _bool(*shape):
    return torch.ones(shape, dtype=torch.bool)


# ---- 1. ConditionDropout ----------------------------------------------------------------------


@pytest.mark.parametrize(("text_shape", "available_shape"), [((1, 5), (4, 2)), ((2, 5), (1, 2)), ((3, 5), (2, 2))])
def test_condition_dropout_refuses_masks_of_different_batch_sizes(text_shape, available_shape):
    with pytest.raises(InputError) as caught:
        ConditionDropout(p_text=0.5, p_images_all=0.2, p_both=0.2)(_bool(*text_shape), _bool(*available_shape))
    message = str(caught.value)
    assert message.startswith("text_mask, cond_available: expected the same batch size")
    assert str(text_shape) in message and str(available_shape) in message


@pytest.mark.parametrize(("text_mask", "cond_available", "name", "fragment"), [
    (_bool(5), None, "text_mask", "got 1 with shape (5,)"),
    (_bool(2, 5, 1), _bool(2, 2), "text_mask", "got 3 with shape (2, 5, 1)"),
    (None, _bool(2), "cond_available", "got 1 with shape (2,)"),
    (torch.ones(2, 5), _bool(2, 2), "text_mask", "bool tensor (True = present), got torch.float32"),
    (_bool(2, 5), torch.ones(2, 2, dtype=torch.int64), "cond_available", "got torch.int64"),
    ([[True] * 5] * 2, None, "text_mask", "got list"),
])
def test_condition_dropout_refuses_masks_of_the_wrong_rank_dtype_or_type(text_mask, cond_available, name, fragment):
    with pytest.raises(InputError) as caught:
        ConditionDropout()(text_mask, cond_available)
    assert str(caught.value).startswith(f"{name}: expected")
    assert fragment in str(caught.value)


def test_condition_dropout_refuses_masks_on_different_devices_and_no_masks_at_all():
    with pytest.raises(InputError, match=r"^cond_available: expected a tensor on text_mask's device cpu, got one on meta"):
        ConditionDropout()(_bool(2, 5), torch.ones(2, 2, dtype=torch.bool, device="meta"))
    with pytest.raises(InputError, match=r"^text_mask, cond_available: expected at least one of them, got None for both"):
        ConditionDropout()(None, None)


def test_condition_dropout_keeps_valid_shapes_and_draws_per_sample():
    text_mask, available = ConditionDropout(p_text=0, p_images_all=0, p_both=1.0)(_bool(3, 5), _bool(3, 2))
    assert text_mask.shape == (3, 5) and available.shape == (3, 2)
    assert not text_mask.any() and not available.any()


# ---- 2. EncodedConditions from another model ---------------------------------------------------


def test_conditions_encoded_by_a_model_with_other_fusion_sites_are_refused(model):
    other = UNet3D(_spec(dynamic_conv_levels=(), cross_attention_levels=(1, 2)))
    conditions = other.encode_conditions(**_raw())
    with pytest.raises(InputError) as caught:
        model(torch.randn(X_SHAPE), 10, conditions=conditions)
    message = str(caught.value)
    assert message.startswith("conditions: expected features for this model's fusion sites (maps ['level1']")
    assert "got maps [], context ['level1', 'level2', 'mid']" in message and "encode_conditions" in message


def test_conditions_encoded_by_a_model_with_other_channels_are_refused(model):
    conditions = UNet3D(_spec(channels=(16, 16))).encode_conditions(**_raw())
    with pytest.raises(InputError) as caught:
        model(torch.randn(X_SHAPE), 10, conditions=conditions)
    assert str(caught.value).startswith("conditions.maps['level1']: expected a tensor of shape (2, 8, 4, 16, 16)")
    assert "got shape (2, 16, 4, 16, 16)" in str(caught.value)


def test_text_only_conditions_are_not_broadcast_into_a_text_and_image_model(model):
    conditions = UNet3D(_spec(image_channels=0)).encode_conditions(**_raw(images=False))
    with pytest.raises(InputError) as caught:
        model(torch.randn(X_SHAPE), 10, conditions=conditions)
    assert str(caught.value).startswith("conditions.maps['level1']: expected a tensor of shape (2, 8, 4, 16, 16)")
    assert "got shape (2, 8, 1, 1, 1)" in str(caught.value)


def test_timestep_modulation_present_or_missing_against_the_spec_is_refused(model):
    modulated = UNet3D(_spec(text_to_timestep=True))
    with pytest.raises(InputError, match=r"^conditions\.timestep_scale_shift: expected None .*text_to_timestep=False"):
        model(torch.randn(X_SHAPE), 10, conditions=modulated.encode_conditions(**_raw()))
    with pytest.raises(InputError, match=r"^conditions\.timestep_scale_shift: expected a tensor of shape \(2, 32\).*"
                                         r"got NoneType"):
        modulated(torch.randn(X_SHAPE), 10, conditions=model.encode_conditions(**_raw()))


def test_conditions_encoded_before_the_model_was_cast_are_refused_and_fresh_ones_work():
    model = UNet3D(_spec()).eval()
    conditions = model.encode_conditions(**_raw())
    model.to(torch.bfloat16)
    x = torch.randn(X_SHAPE, dtype=torch.bfloat16)
    with pytest.raises(InputError) as caught:
        model(x, 10, conditions=conditions)
    message = str(caught.value)
    assert message.startswith("conditions.maps['level1']: expected conditions encoded on the model's device cpu in "
                              "its dtype torch.bfloat16, got torch.float32")
    assert "Encode them again" in message
    fresh = model.encode_conditions(**{k: v.bfloat16() for k, v in _raw().items()})
    assert model(x, 10, conditions=fresh).dtype == torch.bfloat16


def test_conditions_on_another_device_or_with_a_wrong_mask_are_refused(model):
    conditions = model.encode_conditions(**_raw())
    on_meta = dataclasses.replace(conditions, maps={k: v.to("meta") for k, v in conditions.maps.items()})
    with pytest.raises(InputError, match=r"^conditions\.maps\['level1'\]: .*got torch\.float32 on meta"):
        model(torch.randn(X_SHAPE), 10, conditions=on_meta)
    float_mask = dataclasses.replace(conditions, context_mask={k: v.float() for k, v in conditions.context_mask.items()})
    with pytest.raises(InputError, match=r"^conditions\.context_mask\['level2'\]: expected a bool tensor, got torch\.float32"):
        model(torch.randn(X_SHAPE), 10, conditions=float_mask)


# ---- 3. from_pretrained(device=...) and file paths ------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ck") / "a"
    save_pretrained(UNet3D(_spec()), directory)
    return directory


@pytest.mark.parametrize(("device", "fragment"), [
    ("gpu", "got 'gpu', which torch does not know"),
    ("meta", "expected a device that holds the loaded values, got 'meta'"),
    (None, "got NoneType None"),
    (True, "got bool True"),
    (-1, "non-negative device index, got -1"),
    pytest.param("cuda", "got 'cuda', but CUDA is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available")),
    pytest.param(0, "got index 0, but no accelerator", marks=pytest.mark.skipif(
        not hasattr(torch, "accelerator") or torch.accelerator.is_available(), reason="an accelerator is available")),
    pytest.param("cuda:99", "got 'cuda:99'. Pass an index in that range", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA is not available")),
])
def test_a_bad_device_is_blamed_on_the_device_not_the_file(saved, device, fragment):
    with pytest.raises(InputError) as caught:
        UNet3D.from_pretrained(saved, device=device)
    assert not isinstance(caught.value, CheckpointError)
    assert str(caught.value).startswith("device: expected") and fragment in str(caught.value)


def test_the_device_is_checked_before_the_directory(tmp_path):
    with pytest.raises(InputError, match=r"^device: .*'gpu'"):
        from_pretrained(tmp_path / "does-not-exist", device="gpu")


def test_a_valid_device_still_loads(saved):
    model = UNet3D.from_pretrained(saved, device=torch.device("cpu"))
    assert next(model.parameters()).device == torch.device("cpu")


def test_a_checkpoint_file_instead_of_its_directory_says_so(saved):
    with pytest.raises(CheckpointError) as caught:
        UNet3D.from_pretrained(saved / WEIGHTS_FILE)
    message = str(caught.value)
    assert message.startswith("directory: expected a checkpoint directory") and "got the file" in message
    assert f"Pass the directory that contains it: {str(saved)!r}" in message


def test_a_directory_that_is_not_a_path_is_refused():
    with pytest.raises(CheckpointError, match=r"^directory: expected a path .*got NoneType"):
        from_pretrained(None)


# ---- 4. guidance helpers ---------------------------------------------------------------------


def test_guided_prediction_refuses_missing_conditions_and_a_numpy_volume(model):
    branches = guidance_conditions(model, **_raw())
    with pytest.raises(InputError, match=r"^conditions: expected the EncodedConditions of guidance_conditions.*got NoneType"):
        guided_prediction(model, torch.randn(X_SHAPE), 10, None, image_scale=1.5, text_scale=7.5)
    with pytest.raises(InputError, match=r"^x: expected a torch\.Tensor .*got ndarray"):
        guided_prediction(model, np.zeros(X_SHAPE, dtype=np.float32), 10, branches, image_scale=1.5, text_scale=7.5)


def test_guided_prediction_reports_the_callers_shapes_not_the_tripled_ones(model):
    branches = guidance_conditions(model, **_raw())
    with pytest.raises(InputError) as caught:
        guided_prediction(model, torch.randn(X_SHAPE), torch.tensor([1, 2, 3]), branches, image_scale=1, text_scale=1)
    assert str(caught.value).startswith("t: expected shape () or (2,)") and "got (3,)" in str(caught.value)


def test_per_sample_scales_apply_to_their_own_sample(model):
    x, branches = torch.randn(X_SHAPE), guidance_conditions(model, **_raw())
    per_sample = guided_prediction(model, x, 10, branches, image_scale=torch.tensor([1.5, 3.0]),
                                   text_scale=torch.tensor([7.5, 0.0]))
    first = guided_prediction(model, x, 10, branches, image_scale=1.5, text_scale=7.5)
    second = guided_prediction(model, x, 10, branches, image_scale=3.0, text_scale=0.0)
    assert per_sample.shape == X_SHAPE
    torch.testing.assert_close(per_sample[0], first[0])
    torch.testing.assert_close(per_sample[1], second[1])
    assert not torch.allclose(first[1], second[1])  # the scales do matter
    zero_d = guided_prediction(model, x, 10, branches, image_scale=torch.tensor(1.5), text_scale=7.5)
    torch.testing.assert_close(zero_d, first)


@pytest.mark.parametrize(("scales", "name", "fragment"), [
    ({"image_scale": torch.ones(3), "text_scale": 1.0}, "image_scale", "got shape (3,)"),
    ({"image_scale": 1.0, "text_scale": torch.ones(2, 1)}, "text_scale", "got shape (2, 1)"),
    ({"image_scale": True, "text_scale": 1.0}, "image_scale", "got bool"),
    ({"image_scale": 1.0, "text_scale": "7.5"}, "text_scale", "got str"),
    ({"image_scale": float("nan"), "text_scale": 1.0}, "image_scale", "expected a finite number, got nan"),
    ({"image_scale": 1.0, "text_scale": torch.ones(2, dtype=torch.bool)}, "text_scale", "got torch.bool"),
])
def test_bad_guidance_scales_are_refused_naming_the_scale(model, scales, name, fragment):
    branches = guidance_conditions(model, **_raw())
    with pytest.raises(InputError) as caught:
        guided_prediction(model, torch.randn(X_SHAPE), 10, branches, **scales)
    assert str(caught.value).startswith(f"{name}: expected") and fragment in str(caught.value)


def test_guidance_helpers_refuse_a_spec_or_an_unconditioned_model(model):
    with pytest.raises(InputError, match=r"^guidance_conditions: model: expected a conditioned UNet3D, got UNetSpec"):
        guidance_conditions(model.spec, **_raw())
    plain = UNet3D(UNetSpec.default(sample_size=(4, 16, 16), channels=(8, 16), num_groups=4, head_channels=8,
                                    time_embedding_channels=16))
    with pytest.raises(InputError, match=r"^guidance_conditions: model: .*spec\.conditioning is None"):
        guidance_conditions(plain)
    branches = guidance_conditions(model, **_raw())
    with pytest.raises(InputError, match=r"^guided_prediction: model: expected a conditioned UNet3D, got UNetSpec"):
        guided_prediction(model.spec, torch.randn(X_SHAPE), 10, branches, image_scale=1, text_scale=1)


def test_guidance_conditions_validate_the_raw_conditions_before_tripling_them(model):
    raw = _raw()
    with pytest.raises(InputError, match=r"^text: expected a torch\.Tensor .*got list"):
        guidance_conditions(model, text=raw["text"].tolist(), cond_images=raw["cond_images"])
    with pytest.raises(InputError) as caught:
        guidance_conditions(model, text_pooled=torch.randn(3, E), **raw)
    assert str(caught.value).startswith(f"text_pooled: expected shape (2, {E}), got (3, {E})")


# ---- 5. reported actual values -------------------------------------------------------------------


def test_conditions_for_an_unconditioned_model_report_their_real_type():
    plain = UNet3D(UNetSpec.default(sample_size=(4, 16, 16), channels=(8, 16), num_groups=4, head_channels=8,
                                    time_embedding_channels=16))
    with pytest.raises(InputError, match=r"^conditions: expected None .*got object\. Drop conditions="):
        plain(torch.randn(X_SHAPE), 10, conditions=object())
