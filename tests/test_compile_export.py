"""`torch.compile(fullgraph=True)` and `torch.export` of the default UNet, with shape checks left on.

The checks skip themselves while dynamo or export traces (`contracts.checks_active`), so nothing has
to be switched off by hand. Measured on 2 shared CPU cores (torch 2.13.0+cpu): dynamo tracing of the
default UNet takes 13-20 s with the `eager` backend (about 3x that with `aot_eager`); inductor takes
about 2.5 minutes for the whole default UNet and about 2 minutes even for a 2-level UNet (C++ kernel
compilation). So CI checks that the default UNet is one graph with no break using the `eager`
backend (the same dynamo capture inductor starts from) and runs inductor on one `ResBlock3D` (about
30 s cold, 7 s with inductor's on-disk cache). `torch.export` of the default UNet takes about 5 s.
"""

import pytest
import torch

from cpcbm_blocks import ResBlock3D, UNet3D, UNetSpec, plan

from .conftest import randomize_
from .test_conditioning import inputs, small_conditioned


@pytest.fixture(scope="module")
def default_model_and_input():
    torch.manual_seed(0)
    model = randomize_(UNet3D(UNetSpec.default()), scale=0.02).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    t = torch.tensor([250.0])
    with torch.no_grad():
        expected = model(x, t)
    return model, x, t, expected


def test_fullgraph_compile_of_the_default_unet_has_no_graph_break_and_matches_eager(default_model_and_input):
    model, x, t, expected = default_model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph raises on any graph break
    with torch.no_grad():
        out = compiled(x, t)
    assert out.shape == plan(model.spec, tuple(x.shape)).output_shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_export_of_the_default_unet_matches_eager(default_model_and_input):
    model, x, t, expected = default_model_and_input
    exported = torch.export.export(model, (x, t))
    with torch.no_grad():
        out = exported.module()(x, t)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    other = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other, t), model(other, t), rtol=0, atol=1e-6)


def test_export_with_a_dynamic_batch_runs_other_batch_sizes(default_model_and_input):
    # the input checks must not turn the symbolic batch into a refusal (a SymInt is not an int)
    model, _, _, _ = default_model_and_input
    batch = torch.export.Dim("batch", min=2, max=8)
    x, t = torch.randn(2, 1, 8, 16, 16), torch.tensor([250.0, 10.0])
    exported = torch.export.export(model, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
    x3, t3 = torch.randn(3, 1, 8, 16, 16), torch.tensor([250.0, 10.0, 999.0])
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x3, t3), model(x3, t3), rtol=0, atol=1e-6)


def test_inductor_compiles_a_shape_checked_block_and_matches_eager():
    torch._dynamo.reset()
    block = randomize_(ResBlock3D(in_channels=8, out_channels=16, emb_channels=16, num_groups=4), scale=0.05)
    x, emb = torch.randn(2, 8, 4, 8, 8), torch.randn(2, 16)
    with torch.no_grad():
        expected = block(x, emb)
        out = torch.compile(block, fullgraph=True, backend="inductor")(x, emb)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_export_of_a_conditioned_unet_with_keyword_conditions_matches_eager():
    # torch.compile(fullgraph=True, backend="eager") of this model also succeeds (about 60 s on 2 busy
    # cores, so it is not run in CI); export covers the same capture of the fusion steps.
    model = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05).eval()
    x, t, conditions = torch.randn(2, 1, 4, 16, 16), torch.tensor([5.0, 500.0]), inputs()
    conditions["text_mask"][1] = False
    with torch.no_grad():
        expected = model(x, t, **conditions)
        out = torch.export.export(model, (x, t), kwargs=conditions).module()(x, t, **conditions)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
