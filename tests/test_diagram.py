"""The generated diagrams and tables: every level, skip, attention site and the head are drawn."""

import importlib
import re

import einops
import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from cpcbm_blocks import (
    CrossAttentionFusion3D,
    Downsample3D,
    DynamicConvFusion3D,
    GatedFusion3D,
    GatedInjection3D,
    MultiHeadSelfAttention3D,
    OutputHead,
    ResBlock3D,
    TimestepEmbedding,
    UNet3D,
    UNetSpec,
    Upsample3D,
    plan,
)
from cpcbm_blocks.diagram import block_diagram, parameter_counts, transition_table, unet_diagram, unet_legend

from .conftest import unet_specs, valid_input_shapes

NOMINAL = (1, 1, 8, 256, 256)


def _nodes(text: str) -> dict[str, str]:
    """Block ids of a block-beta diagram -> their label."""
    return dict(re.findall(r'(\w+)\["([^"]*)"\]', text))


def _edges(text: str) -> list[tuple[str, str, str | None]]:
    edges = []
    for source, label, target in re.findall(r'^\s*(\w+) (?:-- "([^"]*)" )?--> (\w+)$', text, re.MULTILINE):
        edges.append((source, target, label or None))
    return edges


def _classes(text: str, name: str) -> set[str]:
    match = re.search(rf"^\s*class (\S+) {name}$", text, re.MULTILINE)
    return set(match.group(1).split(",")) if match else set()


def test_default_unet_diagram_draws_every_level_skip_attention_site_and_the_head():
    text = unet_diagram(plan(UNetSpec.default(), NOMINAL))
    nodes, edges = _nodes(text), _edges(text)
    assert text.startswith("block-beta\n  columns 3\n")
    expected_levels = [(32, "8×256×256"), (64, "4×128×128"), (128, "2×64×64"), (256, "1×32×32")]
    for number, (channels, size) in enumerate(expected_levels, start=1):
        assert nodes[f"down{number}"].startswith(f"level {number} down · {channels} ch · {size}")
        assert nodes[f"up{number}"].startswith(f"level {number} up · {channels} ch · {size}")
    assert "down (1,2,2) → 256,1,16,16" in nodes["down4"]
    assert "2× [res → attn]" in nodes["down4"]
    assert nodes["mid"] == "mid · 256 ch · 1×16×16<br/>2× [res → attn → res]"
    assert nodes["stem"] == "input x · 1,8,256,256<br/>conv_in → 32 ch"
    assert nodes["head"].endswith("output · 1,8,256,256")
    skips = {(s, t): label for s, t, label in edges if label}
    assert skips == {("down1", "up1"): "2 skips · 32,8,256,256", ("down2", "up2"): "2 skips · 64,4,128,128",
                     ("down3", "up3"): "2 skips · 128,2,64,64", ("down4", "up4"): "2 skips · 256,1,32,32"}
    path = [(s, t) for s, t, label in edges if not label]
    assert path == [("stem", "down1"), ("down1", "down2"), ("up2", "up1"), ("down2", "down3"), ("up3", "up2"),
                    ("down3", "down4"), ("up4", "up3"), ("down4", "mid"), ("mid", "up4"), ("up1", "head")]
    assert _classes(text, "attention") == {"down4", "up4", "mid"}
    assert not re.search(r"^\s*class \S+ fuse_", text, re.MULTILINE)
    assert unet_legend(plan(UNetSpec.default(), NOMINAL)) == "Legend: orange fill: self-attention."


def test_conditioned_unet_diagram_marks_each_fusion_kind_where_it_sits():
    expected = plan(UNetSpec.conditioned(), NOMINAL)
    text = unet_diagram(expected)
    nodes = _nodes(text)
    assert _classes(text, "fuse_dynconv") == {"down1", "up1", "down2", "up2"}
    assert _classes(text, "fuse_xattn") == {"down3", "up3", "down4", "up4", "mid"}
    assert _classes(text, "attention") == {"down4", "up4", "mid"}
    assert "2× res → fuse_dynconv" in nodes["down1"]
    assert "2× [res → attn] → fuse_xattn" in nodes["down4"]
    assert "2× [res → attn → fuse_xattn → res]" in nodes["mid"]
    legend = unet_legend(expected)
    assert "dynamic-convolution fusion (`fuse_dynconv`)" in legend and "cross-attention fusion (`fuse_xattn`)" in legend
    assert "gated" not in legend


@given(data=st.data())
def test_unet_diagram_follows_any_spec(data):
    spec = data.draw(unet_specs())
    shape = data.draw(valid_input_shapes(spec))
    text = unet_diagram(plan(spec, shape))
    nodes, edges = _nodes(text), _edges(text)
    levels = len(spec.levels)
    assert {f"down{n}" for n in range(1, levels + 1)} | {f"up{n}" for n in range(1, levels + 1)} <= set(nodes)
    skip_edges = [(s, t, label) for s, t, label in edges if label]
    assert [(s, t) for s, t, _ in skip_edges] == [(f"down{n}", f"up{n}") for n in range(1, levels + 1)]
    for (_, _, label), level in zip(skip_edges, spec.levels):
        count = level.num_res_blocks
        assert label.startswith(f"{count} skip{'s' if count != 1 else ''} · {level.channels},")
    attention = {f"down{n}" for n, lv in enumerate(spec.levels, 1) if lv.attention}
    attention |= {f"up{n}" for n, lv in enumerate(spec.levels, 1) if lv.attention}
    attention |= {"mid"} if spec.mid.attention else set()
    assert _classes(text, "attention") == attention
    assert not re.search(r"^\s*class \S+ fuse_", text, re.MULTILINE)   # drawn specs are unconditioned
    assert f"{spec.mid.num_segments}× [" in nodes["mid"]
    assert nodes["head"].endswith("output · " + ",".join(map(str, plan(spec, shape).output_shape[1:])))


def test_parameter_counts_cover_the_whole_model_including_shared_weights(tiny_spec):
    for spec in (UNetSpec.default(), tiny_spec, UNetSpec.default(mid=UNetSpec.default().mid.__class__(share_weights=True))):
        counts = parameter_counts(spec)
        with torch.device("meta"):
            model = UNet3D(spec)
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


def test_transition_table_has_a_row_per_transition_and_totals_the_model():
    spec = UNetSpec.default()
    expected = plan(spec, NOMINAL)
    table = transition_table(expected, parameter_counts(spec))
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(expected.transitions) + 2
    assert rows[0] == "| 1 | down stem, step 1 (conv_in) | `conv_in` | 1,8,256,256 | 32,8,256,256 | 896 |"
    assert "| 32,8,256,256 + 32,8,256,256 | 32,8,256,256 |" in rows[-4]
    assert rows[-3].startswith("| 39 | output head (beyond the seed trace) | `head` | 32,8,256,256 | 1,8,256,256 |")
    with torch.device("meta"):
        total = sum(p.numel() for p in UNet3D(spec).parameters())
    assert rows[-1] == f"| | **total** | | | | **{total:,}** |"


def test_transition_table_counts_shared_middle_modules_once():
    from cpcbm_blocks import MidSpec

    spec = UNetSpec.default(mid=MidSpec(share_weights=True, kernel_size=(1, 3, 3)))
    table = transition_table(plan(spec, NOMINAL), parameter_counts(spec))
    assert table.count("shared with `mid1_res1`") == 1
    with torch.device("meta"):
        total = sum(p.numel() for p in UNet3D(spec).parameters())
    assert f"**{total:,}**" in table


def _flow(text: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    nodes = dict(re.findall(r'^\s*(\w+)\(?\["([^"]*)"\]\)?$', text, re.MULTILINE))
    edges = set(re.findall(r"^\s*(\w+) --> (\w+)$", text, re.MULTILINE))
    return nodes, edges


def test_resblock_diagram_shows_both_branches_and_the_injection():
    block = ResBlock3D(in_channels=4, out_channels=8, emb_channels=16, num_groups=2)
    text = block_diagram(block, torch.randn(2, 4, 2, 4, 4), torch.randn(2, 16))
    nodes, edges = _flow(text)
    by_label = {label.split("<br/>")[0]: node for node, label in nodes.items()}
    assert nodes[by_label["input x"]] == "input x<br/>2,4,2,4,4"
    assert nodes[by_label["input emb"]] == "input emb<br/>2,16"
    for name in ("norm1: GroupNorm", "conv1: Conv3d 3×3×3", "emb_proj.1: Linear", "norm2: GroupNorm",
                 "conv2: Conv3d 3×3×3", "skip: Conv3d 1×1×1"):
        assert name in by_label, name
    assert (by_label["input x"], by_label["skip: Conv3d 1×1×1"]) in edges      # the residual path
    assert (by_label["input x"], by_label["norm1: GroupNorm"]) in edges
    adds = [node for node, label in nodes.items() if label.startswith("+<br/>")]
    assert len(adds) == 2                                                      # injection and residual
    assert (adds[-1], "output") in edges and nodes[adds[-1]] == "+<br/>2,8,2,4,4"


def test_attention_diagram_goes_through_sdpa_and_back_to_a_volume():
    block = MultiHeadSelfAttention3D(channels=8, head_channels=4, num_groups=2)
    text = block_diagram(block, torch.randn(1, 8, 1, 2, 3))
    labels = list(_flow(text)[0].values())
    assert "scaled_dot_product_attention<br/>1,2,6,4" in labels
    assert "rearrange 'b c d h w -> b (d h w) c'<br/>1,6,8" in labels
    assert "rearrange 'b (d h w) c -> b c d h w'<br/>1,8,1,2,3" in labels


@pytest.mark.parametrize("make, inputs, keywords", [
    (lambda: Downsample3D(channels=4, stride=(1, 2, 2)), (torch.randn(1, 4, 2, 4, 4),), {}),
    (lambda: Upsample3D(channels=4, stride=(2, 2, 2)), (torch.randn(1, 4, 2, 4, 4),), {}),
    (lambda: OutputHead(in_channels=4, out_channels=1, num_groups=2), (torch.randn(1, 4, 2, 4, 4),), {}),
    (lambda: TimestepEmbedding(channels=8, out_channels=16), (torch.tensor([1.0, 2.0]),), {"batch_size": 2}),
    (lambda: GatedInjection3D(channels=4), (torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)), {}),
    (lambda: DynamicConvFusion3D(channels=4, num_groups=2), (torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)), {}),
    (lambda: CrossAttentionFusion3D(channels=4, context_channels=6, head_channels=2, num_groups=2),
     (torch.randn(2, 4, 1, 2, 2), torch.randn(2, 3, 6), torch.tensor([[True, True, False], [False, False, False]])), {}),
    (lambda: GatedFusion3D(channels=4, text_channels=6),
     (torch.randn(2, 6), torch.randn(2, 4, 1, 2, 2), torch.tensor([True, False]), torch.tensor([False, True])), {}),
], ids=["Downsample3D", "Upsample3D", "OutputHead", "TimestepEmbedding", "GatedInjection3D", "DynamicConvFusion3D",
        "CrossAttentionFusion3D", "GatedFusion3D"])
def test_every_block_can_be_drawn_and_its_output_shape_is_the_real_one(make, inputs, keywords):
    block = make()
    text = block_diagram(block, *inputs, **keywords)
    nodes, edges = _flow(text)
    last = next(source for source, target in edges if target == "output")
    assert nodes[last].endswith("<br/>" + ",".join(map(str, block(*inputs, **keywords).shape)))


class _DataDependent(torch.nn.Module):
    """Calls `rearrange` (patched while tracing), then branches on data, which fx cannot trace."""

    def forward(self, x):
        y = rearrange(x, "b c d h w -> b (d h w) c")
        return y if y.sum() > 0 else -y


def test_tracing_restores_the_patched_globals_even_when_it_fails():
    with pytest.raises(torch.fx.proxy.TraceError):
        block_diagram(_DataDependent(), torch.randn(1, 2, 1, 2, 2))
    assert rearrange is einops.rearrange
    block_diagram(MultiHeadSelfAttention3D(channels=8, head_channels=4, num_groups=2), torch.randn(1, 8, 1, 2, 2))
    # `cpcbm_blocks.blocks.attention` as an attribute is the function; the module is in sys.modules.
    assert importlib.import_module("cpcbm_blocks.blocks.attention").rearrange is einops.rearrange


def test_block_diagram_needs_one_to_three_example_inputs():
    with pytest.raises(ValueError, match="1 to 4 example inputs"):
        block_diagram(OutputHead(in_channels=4, out_channels=1, num_groups=2))
