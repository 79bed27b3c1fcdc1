import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cpcbm_blocks import Conv3d
from cpcbm_blocks.blocks.conv_by_taps import by_taps_pays, conv3d_by_taps
from cpcbm_blocks.blocks.conv_onednn import meta_stands_for
from cpcbm_blocks.blocks.head import OutputHead


@given(batch=st.integers(0, 2), depth=st.integers(1, 5), height=st.integers(1, 6), width=st.integers(1, 6),
       out_channels=st.integers(1, 3), kernel=st.sampled_from([(3, 3, 3), (1, 3, 3), (3, 1, 5), (5, 5, 5), (1, 1, 3)]),
       bias=st.booleans())
def test_by_taps_equals_conv3d_in_float64_with_every_gradient(batch, depth, height, width, out_channels, kernel, bias):
    """Any size, including volumes smaller than the kernel (taps that only ever meet padding)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 4, depth, height, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_channels, 4, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_channels, dtype=torch.float64, requires_grad=True) if bias else None
    ours = conv3d_by_taps(x, weight, b)
    reference = F.conv3d(x, weight, b, padding=tuple(k // 2 for k in kernel))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(reference)
    inputs = (x, weight) if b is None else (x, weight, b)
    for a, r in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_in_float32_by_taps_is_as_close_to_the_exact_convolution_as_onednn_is():
    """The head at a realistic size: both fp32 forms against float64, output and gradients."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 8, 48, 48, requires_grad=True)
    weight = (torch.randn(1, 32, 3, 3, 3) * 0.1).requires_grad_()
    bias = torch.randn(1, requires_grad=True)
    grad = torch.randn(1, 1, 8, 48, 48)
    exact_inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    exact_out = F.conv3d(*exact_inputs, padding=1)
    exact = [exact_out, *torch.autograd.grad(exact_out, exact_inputs, grad.double())]
    for form in (conv3d_by_taps, lambda *a: F.conv3d(*a, padding=1)):
        out = form(x, weight, bias)
        ours = [out, *torch.autograd.grad(out, (x, weight, bias), grad)]
        for a, e in zip(ours, exact):
            assert (a.double() - e).abs().max() <= 1e-5 * e.abs().max()


class _Operators(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_output_head_runs_by_taps_on_cpu_with_no_convolution_operator_and_the_same_flops():
    torch.manual_seed(0)
    head = OutputHead(in_channels=32, out_channels=1)
    torch.nn.init.normal_(head.conv.weight)  # zero-initialised: any form would return zeros
    x = torch.randn(1, 32, 4, 12, 12, requires_grad=True)
    with _Operators() as operators, FlopCounterMode(display=False) as flops:
        out = head(x)
        out.backward(torch.randn_like(out))
    assert "mm" in operators.seen and not {"convolution", "convolution_backward"} & operators.seen
    conv_flops = 2 * 32 * 27 * 4 * 12 * 12  # one multiply-add per weight tap and output voxel
    assert flops.get_total_flops() == 3 * conv_flops  # forward, input gradient, weight gradient
    with torch.no_grad():
        reference = F.conv3d(head.act(head.norm(x)), head.conv.weight, head.conv.bias, padding=1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_it_saves_for_backward_what_a_convolution_saves():
    x = torch.randn(1, 32, 4, 8, 8, requires_grad=True)
    weight = torch.randn(1, 32, 3, 3, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv3d_by_taps(x, weight)
    assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr(),
                                                               weight.untyped_storage().data_ptr()]


@pytest.mark.parametrize(("shape", "weight_shape", "stride", "groups", "memory_format", "pays"), [
    ((1, 32, 8, 16, 16), (1, 32, 3, 3, 3), (1, 1, 1), 1, torch.contiguous_format, True),  # the head: 27 <= 64
    ((1, 27, 8, 16, 16), (2, 27, 3, 3, 3), (1, 1, 1), 1, torch.contiguous_format, True),  # 54 = 2 x 27
    ((1, 26, 8, 16, 16), (2, 26, 3, 3, 3), (1, 1, 1), 1, torch.contiguous_format, False),  # 54 > 52
    ((1, 32, 8, 16, 16), (3, 32, 3, 3, 3), (1, 1, 1), 1, torch.contiguous_format, False),  # 81 > 64
    ((1, 32, 8, 16, 16), (1, 32, 3, 3, 3), (1, 2, 2), 1, torch.contiguous_format, False),  # strided
    ((1, 32, 8, 16, 16), (2, 16, 3, 3, 3), (1, 1, 1), 2, torch.contiguous_format, False),  # grouped
    ((1, 32, 8, 16, 16), (1, 32, 2, 2, 2), (1, 1, 1), 1, torch.contiguous_format, False),  # even kernel
    ((1, 32, 8, 16, 16), (1, 32, 1, 1, 1), (1, 1, 1), 1, torch.contiguous_format, False),  # pointwise: a product anyway
    ((1, 32, 8, 16, 16), (1, 32, 3, 3, 3), (1, 1, 1), 1, torch.channels_last_3d, False),  # not the plain layout
])
def test_by_taps_pays_only_where_it_is_exact_and_z_stays_within_twice_the_input(shape, weight_shape, stride, groups,
                                                                                memory_format, pays):
    x = torch.empty(shape).contiguous(memory_format=memory_format)
    assert by_taps_pays(x, torch.empty(weight_shape), stride=stride, groups=groups) is pays


@pytest.mark.parametrize("stands_for", ["cpu", "cuda"])
def test_on_meta_the_planner_gets_the_form_of_the_device_it_plans_for(stands_for):
    with torch.device("meta"):
        conv = Conv3d(32, 1, kernel_size=(3, 3, 3))
        x = torch.empty(1, 32, 8, 16, 16)
    with meta_stands_for(stands_for), _Operators() as operators:
        out = conv(x)
    assert out.shape == (1, 1, 8, 16, 16)
    assert ("convolution" in operators.seen) is (stands_for == "cuda")


def test_autocast_and_channels_last_keep_pytorchs_convolution():
    conv = Conv3d(32, 1, kernel_size=(3, 3, 3))
    x = torch.randn(1, 32, 4, 8, 8)
    with _Operators() as operators, torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and "convolution" in operators.seen
    with _Operators() as operators:  # a volume this small runs oneDNN's operator directly (conv.py)
        out = conv(x.to(memory_format=torch.channels_last_3d))
    assert operators.seen & {"convolution", "mkldnn_convolution"} and "mm" not in operators.seen
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)


def test_a_shift_that_is_not_one_value_per_output_channel_is_refused_not_broadcast():
    from cpcbm_blocks import InputError, ShapeContractError, shape_checks

    conv = Conv3d(4, 3, kernel_size=(3, 3, 3))
    x = torch.randn(1, 4, 2, 5, 5)
    shift = torch.randn(3)
    torch.testing.assert_close(conv(x, shift=shift), conv(x) + shift[:, None, None, None])
    for wrong in (torch.randn(1), torch.randn(1, 3)):
        # the contract refuses it while checks are on; the explicit check, which stays when they are off
        with pytest.raises(ShapeContractError, match=r"Conv3d.forward: shift: expected Float\[Tensor, '3'\] \| None"):
            conv(x, shift=wrong)
        with shape_checks(False), pytest.raises(
                InputError, match=r"shift: expected one value per output channel, shape \(3,\), got"):
            conv(x, shift=wrong)
    with pytest.raises(InputError, match=r"device: expected one of \['cpu', 'cuda'\], got 'tpu'"), \
            meta_stands_for("tpu"):
        pass


@pytest.mark.parametrize(("x_shape", "weight_shape", "bias_shape", "message"), [
    ((1, 4, 2, 5, 5), (1, 3, 3, 3, 3), None, r"x, weight: expected .* same c_in, got \(1, 4, 2, 5, 5\) and \(1, 3,"),
    ((4, 2, 5, 5), (1, 4, 3, 3, 3), None, r"x, weight: expected x \(b, c_in, d, h, w\)"),
    ((1, 4, 2, 5, 5), (1, 4, 2, 2, 2), None, r"weight: expected an odd kernel size along every axis .* \(2, 2, 2\)"),
    ((1, 4, 2, 5, 5), (2, 4, 3, 3, 3), (1,), r"bias: expected shape \(2,\), one value per output channel, got \(1,\)"),
])
def test_conv3d_by_taps_refuses_what_it_cannot_compute_by_name(x_shape, weight_shape, bias_shape, message):
    from cpcbm_blocks import InputError

    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(InputError, match=message):
        conv3d_by_taps(torch.zeros(x_shape), torch.zeros(weight_shape), bias)
