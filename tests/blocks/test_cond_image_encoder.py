import pytest
import torch

from cpcbm_blocks import CondImageEncoder3D, ShapeContractError, UNetSpec, plan
from cpcbm_blocks.layout import Op

from ..conftest import randomize_


def _encoder(spec):
    downs = [t.step for t in plan(spec, (1, 1, *(s for s in spec.stride_product))).transitions if t.step.op is Op.DOWN]
    return CondImageEncoder3D(image_channels=3, channels=tuple(lv.channels for lv in spec.levels),
                              strides=tuple(lv.stride for lv in spec.levels),
                              kernel_sizes=tuple(lv.kernel_size for lv in spec.levels),
                              down_kernel_sizes=tuple(s.kernel_size for s in downs), num_groups=spec.num_groups)


def test_features_have_exactly_each_levels_channels_and_shape_at_full_size():
    spec = UNetSpec.default()
    with torch.device("meta"):
        encoder = _encoder(spec)
    features = encoder(torch.empty(1, 3, 8, 256, 256, device="meta"), torch.ones(1, 3, dtype=torch.bool, device="meta"))
    p = plan(spec, (1, 1, 8, 256, 256))
    level_shapes = [t.out_shape for t in p.transitions if t.step.section.value == "down" and t.step.index == 1
                    and t.step.group > 0]
    mid_shape = next(t.in_shape for t in p.transitions if t.step.section.value == "mid")
    assert [tuple(f.shape[1:]) for f in features] == [*level_shapes, mid_shape]


def test_an_absent_image_differs_from_a_present_all_zero_image():
    spec = UNetSpec.default(channels=(8, 16), num_groups=4, sample_size=(2, 8, 8))
    encoder = randomize_(_encoder(spec), scale=0.2)
    zeros = torch.zeros(1, 3, 2, 8, 8)
    present = encoder(zeros, torch.ones(1, 3, dtype=torch.bool))
    absent = encoder(zeros, torch.tensor([[True, False, True]]))
    assert not torch.allclose(present[0], absent[0])


def test_gradient_reaches_every_parameter():
    spec = UNetSpec.default(channels=(8, 16), num_groups=4, sample_size=(2, 8, 8))
    encoder = randomize_(_encoder(spec), scale=0.2)
    sum(f.square().sum() for f in encoder(torch.randn(2, 3, 2, 8, 8), torch.ones(2, 3, dtype=torch.bool))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_wrong_image_count_raises_our_contract_error():
    spec = UNetSpec.default(channels=(8, 16), num_groups=4, sample_size=(2, 8, 8))
    with pytest.raises(ShapeContractError, match="CondImageEncoder3D.forward"):
        _encoder(spec)(torch.randn(1, 2, 2, 8, 8), torch.ones(1, 2, dtype=torch.bool))
