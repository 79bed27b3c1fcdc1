import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cpcbm_blocks import Conv3d, InputError
from cpcbm_blocks.blocks import conv as conv_module
from cpcbm_blocks.blocks import conv_onednn
from cpcbm_blocks.blocks import conv_weight_grad as weight_grad_module
from cpcbm_blocks.blocks.conv_weight_grad import weight_grad_by_depth_taps


@given(batch=st.integers(1, 2), depth=st.integers(1, 4), size=st.integers(3, 9), stride=st.sampled_from([1, 2]),
       kernel=st.sampled_from([(1, 3, 3), (1, 1, 1), (1, 5, 5)]))
def test_planar_fast_path_equals_conv3d_with_the_same_weights(batch, depth, size, stride, kernel):
    torch.manual_seed(0)
    conv = Conv3d(3, 5, kernel_size=kernel, stride=(1, stride, stride))
    assert conv.planar
    x = torch.randn(batch, 3, depth, size, size)
    reference = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(conv(x), reference, rtol=1e-5, atol=1e-5)


def test_planar_kernel_equals_a_full_kernel_on_a_one_deep_volume():
    """The decision behind (1,3,3) kernels where depth is 1: a 3x3x3 kernel with zero padding only
    ever meets real data with its centre depth tap, so it computes the same function."""
    torch.manual_seed(0)
    full = Conv3d(4, 6, kernel_size=(3, 3, 3))
    planar = Conv3d(4, 6, kernel_size=(1, 3, 3))
    with torch.no_grad():
        planar.weight.copy_(full.weight[:, :, 1:2])
        planar.bias.copy_(full.bias)
    x = torch.randn(2, 4, 1, 16, 16)
    torch.testing.assert_close(planar(x), full(x), rtol=1e-5, atol=1e-5)
    assert planar.weight.numel() * 3 == full.weight.numel()


def test_planar_path_accepts_channels_last_3d_and_gives_the_same_result():
    torch.manual_seed(0)
    conv = Conv3d(4, 4, kernel_size=(1, 3, 3))
    x = torch.randn(1, 4, 2, 8, 8)
    torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last_3d)), conv(x))


def test_state_dict_keys_and_shapes_match_torch_conv3d():
    ours = Conv3d(2, 3, kernel_size=(1, 3, 3))
    theirs = torch.nn.Conv3d(2, 3, kernel_size=(1, 3, 3))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@given(batch=st.integers(1, 2), depth=st.integers(1, 3), size=st.integers(3, 9), depth_stride=st.sampled_from([1, 2]),
       stride=st.sampled_from([1, 2]), taps=st.sampled_from([3, 5]))
def test_a_volume_no_deeper_than_the_kernel_folds_into_one_conv2d_equal_to_conv3d(batch, depth, size, depth_stride,
                                                                                   stride, taps):
    torch.manual_seed(0)
    conv = Conv3d(3, 5, kernel_size=(taps, 3, 3), stride=(depth_stride, stride, stride))
    assert conv.folds(depth) and not conv.folds(taps + 1)
    x = torch.randn(batch, 3, depth, size, size, requires_grad=True)
    _assert_equals_conv3d_with_gradients(conv, conv(x), x, tolerance=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(1, 4, 2, 6, 6), (1, 32, 4, 32, 32)], ids=["folded", "onednn-as-is"])
def test_the_fast_forms_return_the_inputs_layout(shape, memory_format):
    # Not a permuted view, which every GroupNorm reading it would copy (and hold for backward).
    conv = Conv3d(shape[1], 8, kernel_size=(3, 3, 3))
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    assert conv(x).is_contiguous(memory_format=memory_format)


def test_deeper_volumes_keep_the_3d_convolution():
    conv = Conv3d(2, 2, kernel_size=(3, 3, 3))
    x = torch.randn(1, 2, 4, 6, 6)
    assert not conv.folds(4)
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=1))


@given(depth=st.sampled_from([4, 8]), depth_stride=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]))
def test_a_shallow_wide_volume_runs_on_onednn_and_equals_conv3d(depth, depth_stride, stride):
    """Stride 1: oneDNN's operator called as it is; strided: depth moved last, where PyTorch picks oneDNN."""
    torch.manual_seed(0)
    conv = Conv3d(32, 8, kernel_size=(3, 3, 3), stride=(depth_stride, stride, stride))
    x = torch.randn(1, 32, depth, 32, 32, requires_grad=True)  # N*C*D*H <= 20480 < N*C*H*W
    with torch.profiler.profile() as profile:
        out = conv(x)
    assert "aten::slow_conv3d_forward" not in {event.key for event in profile.key_averages()}
    assert (type(out.grad_fn).__name__ == "_OneDnnConv3dBackward") == (depth_stride == stride == 1)
    _assert_equals_conv3d_with_gradients(conv, out, x, tolerance=1e-4)


@given(channels=st.sampled_from([(1, 16), (3, 2), (8, 8)]), depth=st.integers(6, 8), height=st.integers(3, 9),
       width=st.integers(3, 9), kernel=st.sampled_from([(3, 3, 3), (5, 3, 3), (3, 1, 5), (1, 1, 1), (2, 2, 2), (2, 1, 4)]),
       bias=st.booleans(),
       channels_last=st.booleans(), method=st.sampled_from(["auto", "depth_taps", "aten"]))
def test_a_volume_pytorch_would_leave_to_slow_conv3d_runs_on_onednn_as_it_is(channels, depth, height, width, kernel,
                                                                             bias, channels_last, method):
    """Batch 1, small `N*C*D*H`: forward and input gradient by `aten.mkldnn_convolution` in the input's layout
    (the input gradient with the kernel flipped and its channels swapped), the weight gradient by any method;
    values and gradients equal `F.conv3d`'s, whose `slow_conv3d` is the reference."""
    weight_grad_module.set_weight_grad_method(method)
    try:
        torch.manual_seed(0)
        conv = Conv3d(*channels, kernel_size=kernel, bias=bias)
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        x = torch.randn(1, channels[0], depth, height, width).contiguous(memory_format=layout).requires_grad_()
        assert not conv_onednn.runs_on_onednn(x, conv.weight, conv.stride, conv.groups)
        with torch.profiler.profile() as profile:
            out = conv(x)
        operators = {event.key for event in profile.key_averages()}
        assert "aten::mkldnn_convolution" in operators and "aten::slow_conv3d_forward" not in operators
        assert type(out.grad_fn).__name__ == "_OneDnnConv3dBackward"
        assert out.is_contiguous(memory_format=layout) or channels[0] == 1  # one channel: both layouts at once
        planned = copy.deepcopy(conv).to("meta")(x.detach().to("meta"))  # the meta kernel conv.py registers
        assert planned.shape == out.shape and planned.stride() == out.stride()
        reference = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
        grad = torch.randn_like(out)
        wrt = (x, conv.weight) if conv.bias is None else (x, conv.weight, conv.bias)
        for ours, theirs in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(reference, wrt, grad)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * max(1.0, theirs.abs().max().item()))
    finally:
        weight_grad_module.set_weight_grad_method("auto")
        weight_grad_module._fastest_form.clear()


def test_flop_counter_counts_onednn_as_is_like_conv3d():
    """torch's FLOP registry lacks `aten.mkldnn_convolution`; conv.py registers a convolution's formula for it,
    so `FlopCounterMode` (the planner, the benchmarks) counts the forward and the input gradient as for F.conv3d."""
    conv = Conv3d(16, 8, kernel_size=(3, 3, 3), bias=False).requires_grad_(False)
    x = torch.randn(1, 16, 4, 24, 24, requires_grad=True)
    counts = []
    for run in (conv, lambda v: F.conv3d(v, conv.weight, None, conv.stride, conv.padding)):
        with FlopCounterMode(display=False) as counter:
            run(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 16 * 8 * 27 * 4 * 24 * 24


@pytest.mark.parametrize("weights", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_on_meta_onednn_as_is_gives_the_cpu_runs_shape_and_layout(memory_format, weights):
    """PyTorch has no meta kernel for `aten.mkldnn_convolution`; conv.py registers one, so the planner can run it.
    oneDNN writes channels-last when the input or the weight is (`model.to(memory_format=...)`)."""
    x = torch.randn(1, 6, 5, 8, 7).contiguous(memory_format=memory_format)
    conv = Conv3d(6, 4, kernel_size=(3, 3, 5)).to(memory_format=weights)
    cpu = conv(x)
    meta = conv.to("meta")(x.to("meta"))
    assert meta.shape == cpu.shape and meta.stride() == cpu.stride()
    for layout in (torch.channels_last, torch.contiguous_format):  # and so for any 2-D call of the operator
        x2, w2 = torch.randn(1, 6, 8, 7).contiguous(memory_format=layout), torch.randn(4, 6, 3, 3)
        cpu = torch.ops.aten.mkldnn_convolution(x2, w2, None, [1, 1], [1, 1], [1, 1], 1)
        meta = torch.ops.aten.mkldnn_convolution(x2.to("meta"), w2.to("meta"), None, [1, 1], [1, 1], [1, 1], 1)
        assert meta.shape == cpu.shape and meta.stride() == cpu.stride()


def test_the_aten_weight_gradient_of_a_slow_conv3d_volume_moves_depth_last(weight_grad_method):
    weight_grad_method("aten")
    conv = Conv3d(32, 8, kernel_size=(3, 3, 3))
    x = torch.randn(1, 32, 4, 32, 32)
    out = conv(x)
    with torch.profiler.profile() as profile:
        out.sum().backward()
    assert not any("slow_conv3d" in event.key for event in profile.key_averages())
    reference = torch.nn.Conv3d(32, 8, kernel_size=3, padding=1)
    reference.load_state_dict(conv.state_dict())
    reference(x).sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_two_samples_of_a_small_volume_keep_their_layout_pytorch_runs_them_on_onednn(memory_format, weight_grad_method):
    """PyTorch hands any batch of two or more to oneDNN: neither the forward nor the weight gradient moves depth last."""
    weight_grad_method("aten")  # oneDNN's 3-D weight gradient, the form that would move depth last
    x = torch.randn(2, 32, 4, 32, 32).contiguous(memory_format=memory_format)
    conv = Conv3d(32, 8, kernel_size=(3, 3, 3), stride=(2, 2, 2))
    assert conv_onednn.runs_on_onednn(x, conv.weight, conv.stride, conv.groups)
    assert not conv_onednn.depth_last_reaches_onednn(x, conv.weight, conv.groups)
    assert conv_onednn.depth_last_reaches_onednn(x[:1], conv.weight, conv.groups)  # one sample would
    with torch.profiler.profile(record_shapes=True) as profile:
        conv(x).sum().backward()
    shapes = [event.input_shapes[1] for event in profile.events() if event.name == "aten::convolution_backward"]
    assert shapes and all(shape == list(x.shape) for shape in shapes)


def _assert_equals_conv3d_with_gradients(conv, out, x, *, tolerance):
    """`out = conv(x)` equals `F.conv3d` with the same weights, and so do the gradients of x, weight and bias."""
    reference = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(out, reference, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    theirs = torch.autograd.grad(reference, (x, conv.weight, conv.bias), grad)
    for a, b in zip(ours, theirs):  # sums of thousands of products, in another order: fp32 rounding scales with them
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


@given(batch=st.integers(1, 2), depth=st.integers(4, 9), size=st.integers(3, 7), depth_stride=st.sampled_from([1, 2]),
       stride=st.sampled_from([1, 2]), taps=st.sampled_from([3, 5]), groups=st.sampled_from([1, 2]))
def test_the_weight_gradient_by_depth_taps_equals_the_3d_one(batch, depth, size, depth_stride, stride, taps, groups):
    torch.manual_seed(0)
    x = torch.randn(batch, 4, depth, size, size)
    weight = torch.randn(6, 4 // groups, taps, 3, 3)
    padding = (taps // 2, 1, 1)
    out = F.conv3d(x, weight, None, (depth_stride, stride, stride), padding, groups=groups)
    grad_out = torch.randn_like(out)
    reference = torch.ops.aten.convolution_backward(grad_out, x, weight, None, (depth_stride, stride, stride), padding,
                                                    (1, 1, 1), False, (0, 0, 0), groups, [False, True, False])[1]
    ours = weight_grad_by_depth_taps(grad_out, x, weight, stride=(depth_stride, stride, stride), padding=padding,
                                     groups=groups)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.fixture
def weight_grad_method():
    """Set the process-wide method inside a test; put back the default and forget measured choices after."""
    yield weight_grad_module.set_weight_grad_method
    weight_grad_module.set_weight_grad_method("auto")
    weight_grad_module._fastest_form.clear()


def _count_weight_grads(monkeypatch) -> dict[str, int]:
    calls = {"depth_taps": 0, "aten": 0, "matmul": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    for name, attribute in (("depth_taps", "weight_grad_by_depth_taps"), ("aten", "_aten_weight_grad"),
                            ("matmul", "_matmul_weight_grad")):
        monkeypatch.setattr(weight_grad_module, attribute, counting(name, getattr(weight_grad_module, attribute)))
    return calls


@pytest.mark.parametrize("method", ["auto", "depth_taps", "aten"])
def test_every_weight_gradient_method_trains_to_conv3ds_gradients(method, weight_grad_method, monkeypatch):
    weight_grad_method(method)
    calls = _count_weight_grads(monkeypatch)
    torch.manual_seed(0)
    conv = Conv3d(4, 6, kernel_size=(3, 3, 3))
    x = torch.randn(2, 4, 6, 8, 8, requires_grad=True)
    out = conv(x)
    _assert_equals_conv3d_with_gradients(conv, out, x, tolerance=1e-5)
    if method == "aten":  # torch's own operator and its own backward
        assert type(out.grad_fn).__name__ == "ConvolutionBackward0" and sum(calls.values()) == 0
    else:
        assert type(out.grad_fn).__name__ == "_Conv3dChosenWeightGradBackward"
        assert calls["depth_taps"] >= 1 and calls["aten"] == (2 if method == "auto" else 0)
    with torch.no_grad():  # inference: torch's own operator, nothing to save
        assert conv(x).grad_fn is None


def test_auto_times_both_forms_once_per_problem_and_keeps_the_faster(weight_grad_method, monkeypatch):
    weight_grad_method("auto")
    calls = _count_weight_grads(monkeypatch)
    conv = Conv3d(4, 6, kernel_size=(3, 3, 3))
    x = torch.randn(1, 4, 6, 8, 8)
    for _ in range(3):
        conv(x).sum().backward()
    # measured once (a warm-up and a timed run of each form), then the faster form alone
    (kept,) = weight_grad_module._fastest_form.values()
    assert kept in ("depth_taps", "aten")
    assert calls == {"depth_taps": 2 + 2 * (kept == "depth_taps"), "aten": 2 + 2 * (kept == "aten"), "matmul": 0}
    conv(torch.randn(1, 4, 5, 8, 8)).sum().backward()  # another problem is measured again
    assert len(weight_grad_module._fastest_form) == 2
    assert sum(calls.values()) == 4 + 2 + 4


def test_on_meta_auto_plans_the_form_this_process_measured_and_the_depth_taps_before_that(weight_grad_method,
                                                                                          monkeypatch):
    """The memory planner runs on `meta`: it plans the weight gradient a CPU run here would compute."""
    weight_grad_method("auto")
    calls = _count_weight_grads(monkeypatch)
    conv = Conv3d(4, 6, kernel_size=(3, 3, 3))
    with torch.device("meta"):
        planned = Conv3d(4, 6, kernel_size=(3, 3, 3))
    planned(torch.empty(1, 4, 6, 8, 8, device="meta")).sum().backward()
    assert calls == {"depth_taps": 1, "aten": 0, "matmul": 0}  # not measured yet: the larger transient
    conv(torch.randn(1, 4, 6, 8, 8)).sum().backward()  # measures the problem on CPU
    (kept,) = weight_grad_module._fastest_form.values()
    calls.update(dict.fromkeys(calls, 0))
    planned(torch.empty(1, 4, 6, 8, 8, device="meta")).sum().backward()
    assert calls == {"depth_taps": kept == "depth_taps", "aten": kept == "aten", "matmul": 0}


def test_a_pointwise_kernel_also_times_the_matrix_product_and_trains_to_conv3ds_gradients(weight_grad_method,
                                                                                          monkeypatch):
    weight_grad_method("auto")
    calls = _count_weight_grads(monkeypatch)
    torch.manual_seed(0)
    conv = Conv3d(5, 3, kernel_size=(1, 1, 1))
    for _ in range(2):
        x = torch.randn(2, 5, 3, 6, 7, requires_grad=True)
        conv.zero_grad()
        _assert_equals_conv3d_with_gradients(conv, conv(x), x, tolerance=1e-5)
    (kept,) = weight_grad_module._fastest_form.values()
    assert calls == {name: 2 + (name == kept) for name in ("depth_taps", "aten", "matmul")}
    assert weight_grad_module._matmul_weight_grad(torch.ones(2, 3, 1, 1, 2), torch.ones(2, 5, 1, 1, 2),
                                           conv.weight).eq(4).all()  # 2 samples x 2 voxels


def test_an_unknown_weight_gradient_method_is_rejected(weight_grad_method):
    with pytest.raises(InputError, match=r"method: expected one of 'auto', 'depth_taps', 'aten', got 'fast'"):
        weight_grad_method("fast")


class _CountOperators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__ + ("(transposed)" if func is torch.ops.aten.convolution.default and args[6] else "")
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _checkpointed_conv(conv, x0, *, apart: bool, monkeypatch):
    """`conv(2 x0)` with `2 x0` a product recipe, under gradient checkpointing; the input saved apart or not."""
    from cpcbm_blocks.rematerialize import recomputable_product, rematerialized_saves, saves_apart

    monkeypatch.setattr(conv_module, "saves_apart", saves_apart if apart else (lambda: False))
    with rematerialized_saves(products=True):
        return conv(recomputable_product(torch.mul, x0, 2.0))


def test_under_checkpointing_a_remade_input_is_gone_before_the_input_gradient_exists(weight_grad_method, monkeypatch):
    from cpcbm_blocks.memory import _Recorder

    weight_grad_method("depth_taps")
    torch.manual_seed(0)
    conv = Conv3d(32, 32, kernel_size=(3, 3, 3))
    x0 = torch.randn(1, 32, 8, 96, 16, requires_grad=True)  # N*C*D*H above SLOW_CONV_LIMIT: oneDNN either way

    class LiveAtInputGradient(TorchDispatchMode):  # what the recorder counts live as the input gradient starts
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            transposed = func is torch.ops.aten.convolution.default and args[6]
            if transposed or (func is torch.ops.aten.convolution_backward.default and args[10][0]):
                live.append((transposed, recorder.live_bytes))
            return func(*args, **(kwargs or {}))

    grads = {}
    for apart in (False, True):
        recorder, live = _Recorder(), []
        recorder.exclude([*conv.parameters(), x0])
        with recorder:
            out = _checkpointed_conv(conv, x0, apart=apart, monkeypatch=monkeypatch)
            with LiveAtInputGradient():
                grads[apart] = torch.autograd.grad(out.square().sum(), [x0, conv.weight, conv.bias])
        assert [transposed for transposed, _ in live] == [apart]  # apart: a transposed convolution, sized by shape
        grads[apart, "live"] = live[0][1]
    for got, want in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = torch.autograd.grad(F.conv3d(2 * x0, conv.weight, conv.bias, padding=1).square().sum(), x0)[0]
    torch.testing.assert_close(grads[True][0], plain, rtol=1e-4, atol=1e-4)
    assert grads[False, "live"] - grads[True, "live"] == x0.numel() * x0.element_size()  # the remade input


@pytest.mark.parametrize(("shape", "out_channels", "stride", "memory_format", "alike"), [
    ((1, 32, 8, 128, 128), 32, (1, 1, 1), torch.contiguous_format, True),
    # the transposed convolution's input, the output gradient, is small enough for slow_conv_transpose3d:
    # measured 224 MiB of columns where convolution_backward's oneDNN input gradient takes 16
    ((1, 128, 4, 64, 64), 64, (1, 1, 1), torch.contiguous_format, False),
    ((1, 32, 8, 128, 128), 32, (2, 2, 2), torch.contiguous_format, False),  # strided: 22 MiB more at 128
    ((1, 32, 8, 128, 128), 32, (1, 1, 1), torch.channels_last_3d, False),
])
def test_the_input_is_saved_apart_only_where_the_transposed_convolution_runs_like_the_input_gradient(
        shape, out_channels, stride, memory_format, alike):
    with torch.device("meta"):
        x = torch.empty(shape).contiguous(memory_format=memory_format)
        weight = torch.empty(out_channels, shape[1], 3, 3, 3)
    assert conv_module._transposes_alike(x, weight, stride, 1) == alike


def test_a_large_weight_gradient_by_halves_of_its_channels_equals_the_whole_one(monkeypatch):
    torch.manual_seed(0)
    x, weight = torch.randn(1, 8, 6, 12, 12), torch.randn(8, 8, 3, 3, 3)
    grad_out = torch.randn(1, 8, 6, 12, 12)
    arguments = {"stride": (1, 1, 1), "padding": (1, 1, 1), "groups": 1}
    whole = weight_grad_module._aten_weight_grad(grad_out, x, weight, **arguments)
    # From x's size up: output halves, then input halves; four calls, each with a quarter of the channels.
    monkeypatch.setattr(weight_grad_module, "WEIGHT_GRAD_HALVES_MIN_BYTES", x.numel() * x.element_size())
    with _CountOperators() as counted:
        halves = weight_grad_module._aten_weight_grad(grad_out, x, weight, **arguments, by_halves=True)
    assert counted.calls["convolution_backward"] == 4
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5)
    # Two samples: a run of channels is no longer contiguous, so no halves (they would be copies).
    with _CountOperators() as counted:
        weight_grad_module._aten_weight_grad(grad_out.expand(2, -1, -1, -1, -1).contiguous(),
                                      x.expand(2, -1, -1, -1, -1).contiguous(), weight, **arguments, by_halves=True)
    assert counted.calls["convolution_backward"] == 1


def test_only_gradient_checkpointing_computes_weight_gradients_by_halves(weight_grad_method, monkeypatch):
    from cpcbm_blocks.rematerialize import rematerialized_saves

    weight_grad_method("depth_taps")
    seen = []
    chosen = conv_module.chosen_weight_grad
    monkeypatch.setattr(conv_module, "chosen_weight_grad",
                        lambda *args, **kwargs: seen.append(kwargs["by_halves"]) or chosen(*args, **kwargs))
    conv = Conv3d(8, 8, kernel_size=(3, 3, 3))
    x = torch.randn(1, 8, 8, 12, 12, requires_grad=True)
    conv(x).sum().backward()
    with rematerialized_saves():
        conv(x).sum().backward()
    with rematerialized_saves(products=True):
        out = conv(x)
    out.sum().backward()
    assert seen == [False, False, True]


def test_a_large_pointwise_convolution_of_one_sample_is_a_matrix_product(monkeypatch):
    torch.manual_seed(0)
    conv = Conv3d(8, 6, kernel_size=(1, 1, 1))
    x = torch.randn(1, 8, 4, 10, 10, requires_grad=True)
    monkeypatch.setattr(conv_module, "POINTWISE_MATMUL_MIN_BYTES", x.numel() * x.element_size())
    with _CountOperators() as counted, FlopCounterMode(display=False) as flops:
        out = conv(x)
        out.sum().backward(retain_graph=True)
    assert counted.calls.get("addmm", 0) == 1 and "convolution" not in counted.calls
    assert flops.get_total_flops() == 3 * 2 * 8 * 6 * 4 * 10 * 10  # forward, input and weight gradients
    _assert_equals_conv3d_with_gradients(conv, out, x, tolerance=1e-5)
    for other in (torch.randn(2, 8, 4, 10, 10), torch.randn(1, 8, 4, 5, 5)):  # two samples; below the size
        with _CountOperators() as counted:
            torch.testing.assert_close(conv(other), F.conv3d(other, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
        assert "addmm" not in counted.calls
