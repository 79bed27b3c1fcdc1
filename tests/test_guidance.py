import pytest
import torch

from cpcbm_blocks import ConditionDropout, InputError, UNet3D, guidance_conditions, guided_prediction

from .conftest import randomize_
from .test_conditioning import inputs, small_conditioned


def test_condition_dropout_rates_match_the_probabilities():
    dropout = ConditionDropout(p_text=0.1, p_images_all=0.15, p_both=0.05, p_image_each=0.2)
    n = 40_000
    text_mask, available = dropout(torch.ones(n, 3, dtype=torch.bool), torch.ones(n, 3, dtype=torch.bool),
                                   generator=torch.Generator().manual_seed(0))
    no_text, no_images = ~text_mask.any(1), ~available.any(1)
    both = no_text & no_images
    tolerance = 4 * (0.25 / n) ** 0.5
    assert abs(both.float().mean() - (0.05 + 0.1 * 0.2 ** 3)) < tolerance  # joint drop, or text + every image by chance
    assert abs((no_text & ~no_images).float().mean() - 0.1 * (1 - 0.2 ** 3)) < tolerance
    assert abs(no_text.float().mean() - 0.15) < tolerance
    # with text kept, only the per-image draw drops images: each one independently at 0.2
    text_only_drawn = ~no_text & ~no_images
    assert abs((~available[text_only_drawn]).float().mean() - 0.2 * (1 - 0.2 ** 2) / (1 - 0.2 ** 3)) < 0.02


def test_condition_dropout_rejects_impossible_probabilities():
    with pytest.raises(InputError, match="p_text \\+ p_images_all \\+ p_both <= 1"):
        ConditionDropout(p_text=0.6, p_images_all=0.6)
    with pytest.raises(InputError, match="ConditionDropout.p_image_each: expected a probability"):
        ConditionDropout(p_image_each=1.5)


def test_guidance_with_unit_scales_is_the_conditioned_prediction_and_with_zero_the_unconditional_one():
    model = randomize_(UNet3D(small_conditioned()), scale=0.05).eval()
    x, given = torch.randn(2, 1, 4, 16, 16), inputs()
    branches = guidance_conditions(model, **given)
    assert branches.batch_size == 6
    t = torch.tensor([100, 900])
    conditioned = model(x, t, **given)
    unconditional = model(x, t, **{**given, "text_mask": torch.zeros(2, 5, dtype=torch.bool),
                                   "cond_available": torch.zeros(2, 3, dtype=torch.bool)})
    image_only = model(x, t, **{**given, "text_mask": torch.zeros(2, 5, dtype=torch.bool)})
    torch.testing.assert_close(guided_prediction(model, x, t, branches, image_scale=1, text_scale=1), conditioned,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_prediction(model, x, t, branches, image_scale=0, text_scale=0), unconditional,
                               rtol=1e-4, atol=1e-5)
    expected = unconditional + 2.0 * (image_only - unconditional) + 5.0 * (conditioned - image_only)
    torch.testing.assert_close(guided_prediction(model, x, t, branches, image_scale=2.0, text_scale=5.0),
                               expected, rtol=1e-4, atol=1e-4)


def test_guidance_needs_the_three_branches():
    model = UNet3D(small_conditioned())
    with pytest.raises(InputError, match="three guidance branches"):
        guided_prediction(model, torch.randn(2, 1, 4, 16, 16), 5, model.encode_conditions(**inputs()),
                          image_scale=1, text_scale=1)


def test_guidance_conditions_without_any_condition_raise_our_error_naming_the_argument():
    with pytest.raises(InputError, match="text: expected token embeddings"):
        guidance_conditions(UNet3D(small_conditioned()))
