"""Diagrams and tables of a spec's UNet and of single blocks, generated from the code (Mermaid text).

The docs site draws every architecture figure with these functions at build time, so a figure can
never disagree with the code that runs:

* [`unet_diagram`][cpcbm_blocks.diagram.unet_diagram] lays out a [`plan`][cpcbm_blocks.plan.plan]
  as a U: the down path on the left, the bottleneck at the bottom, the up path on the right, one row
  per level, with the skips drawn across. It reads only the plan (integer arithmetic, no torch).
* [`block_diagram`][cpcbm_blocks.diagram.block_diagram] traces a block's `forward` with `torch.fx`
  and draws its data flow, with the shape of every intermediate tensor for an example input.
* [`transition_table`][cpcbm_blocks.diagram.transition_table] lists every transition with its
  shapes and the parameters of the module that runs it
  ([`parameter_counts`][cpcbm_blocks.diagram.parameter_counts] builds the UNet on the `meta`
  device, so no memory is allocated).
"""

import inspect
import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from cpcbm_blocks.blocks.conv import Conv3d, conv3d
from cpcbm_blocks.blocks.embedding import sinusoidal_embedding, timesteps_to_batch
from cpcbm_blocks.blocks.upsample_conv import upsample_conv3d
from cpcbm_blocks.layout import Op, Section
from cpcbm_blocks.plan import Plan, Transition
from cpcbm_blocks.spec import UNetSpec

__all__ = ["block_diagram", "parameter_counts", "transition_table", "unet_diagram", "unet_legend"]

_FUSION_STYLES = {
    Op.FUSE_GATED: ("fuse_gated", "stroke:#6a1b9a,stroke-width:4px", "purple border", "gated fusion"),
    Op.FUSE_DYNAMIC_CONV: ("fuse_dynconv", "stroke:#1b5e20,stroke-width:4px", "green border",
                           "dynamic-convolution fusion"),
    Op.FUSE_CROSS_ATTENTION: ("fuse_xattn", "stroke:#0d47a1,stroke-width:4px,stroke-dasharray:6",
                              "dashed blue border", "cross-attention fusion"),
}
"""Per fusion op: Mermaid class, its style, and the words the legend uses for them."""


def _shape(shape: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in shape)


def _spatial(shape: tuple[int, ...]) -> str:
    return "×".join(str(v) for v in shape[1:])


def _stride(stride: tuple[int, int, int]) -> str:
    return "(" + ",".join(str(v) for v in stride) + ")"


def _runs(ops: list[str]) -> str:
    """Compress repeats, left to right: `['res', 'attn', 'res', 'attn', 'fuse']` -> `2× [res → attn] → fuse`."""
    parts, i = [], 0
    while i < len(ops):
        best = (1, 1)  # (period, repetitions)
        for period in range(1, (len(ops) - i) // 2 + 1):
            unit, count = ops[i:i + period], 1
            while ops[i + count * period:i + (count + 1) * period] == unit:
                count += 1
            if count > 1 and period * count > best[0] * best[1]:
                best = (period, count)
        period, count = best
        unit = ops[i:i + period]
        body = unit[0] if period == 1 else "[" + " → ".join(unit) + "]"
        parts.append(body if count == 1 else f"{count}× {body}")
        i += period * count
    return " → ".join(parts)


def unet_diagram(plan: Plan) -> str:
    """The UNet of `plan` as a U-shaped Mermaid `block-beta` diagram.

    One row per level: the down path (left) and the up path (right) of that level, with its channels
    and `D×H×W`, and the skip connections drawn across as labelled arrows. The bottleneck sits
    below the deepest level; the input stem and the output head sit above level 1. Levels with
    self-attention are filled orange; a level or bottleneck with a fusion step gets a border in the
    colour of its fusion kind, and the step is named in its box
    ([`unet_legend`][cpcbm_blocks.diagram.unet_legend] says which colour is which).
    """
    transitions = plan.transitions
    levels = len(plan.spec.levels)
    by_group: dict[tuple[Section, int], list[Transition]] = {}
    for t in transitions:
        by_group.setdefault((t.step.section, t.step.group), []).append(t)
    classes: dict[str, list[str]] = {}

    def classify(node: str, group: list[Transition]) -> None:
        if any(t.step.op is Op.ATTN for t in group):
            classes.setdefault("attention", []).append(node)
        for op in dict.fromkeys(t.step.op for t in group if t.step.op.is_fusion):
            classes.setdefault(_FUSION_STYLES[op][0], []).append(node)

    lines = ["block-beta", "  columns 3"]
    stem = by_group[(Section.DOWN, 0)]
    head = by_group[(Section.HEAD, 0)]
    stem_text = [f"input x · {_shape(stem[0].in_shape)}"] + [
        f"{t.step.op.value} → {t.out_shape[0]} ch" for t in stem]
    head_text = [f"{t.step.op.value}: GroupNorm, SiLU, conv" if t.step.op is Op.HEAD else t.step.op.value
                 for t in head] + [f"output · {_shape(head[-1].out_shape)}"]
    lines.append(f'  stem["{"<br/>".join(stem_text)}"] time["t → timestep embedding<br/>'
                 f'({plan.spec.time_embedding_channels}) into every res"] head["{"<br/>".join(head_text)}"]')
    classify("stem", stem)
    classify("head", head)

    edges = ["  stem --> down1"]
    for number in range(1, levels + 1):
        down, up = by_group[(Section.DOWN, number)], by_group[(Section.UP, number)]
        level = down[0]
        down_ops = [t.step.op.value for t in down if t.step.op is not Op.DOWN]
        resample = next(t for t in down if t.step.op is Op.DOWN)
        down_text = [f"level {number} down · {level.out_shape[0]} ch · {_spatial(level.out_shape)}",
                     _runs(down_ops),
                     f"down {_stride(resample.step.stride)} → {_shape(resample.out_shape)}"]
        upsample = next(t for t in up if t.step.op is Op.UP)
        merging = [t.step.op.value for t in up if t.skip_shape is not None]
        after = [t for t in up if t.step.op is not Op.UP]
        up_text = [f"level {number} up · {after[0].out_shape[0]} ch · {_spatial(after[0].out_shape)}",
                   f"up {_stride(upsample.step.stride)} ← {_shape(upsample.in_shape)}",
                   _runs([("cat skip + " if t.skip_shape is not None else "") + t.step.op.value for t in after])]
        if after[-1].out_shape[0] != after[0].out_shape[0]:
            up_text.append(f"→ {after[-1].out_shape[0]} ch")
        lines.append(f'  down{number}["{"<br/>".join(down_text)}"] space up{number}["{"<br/>".join(up_text)}"]')
        classify(f"down{number}", down)
        classify(f"up{number}", up)
        skips = [t.skip_shape for t in up if t.skip_shape is not None]
        edges.append(f'  down{number} -- "{len(merging)} skip{"s" if len(merging) != 1 else ""} · '
                     f'{_shape(skips[0])}" --> up{number}')
        if number < levels:
            edges.append(f"  down{number} --> down{number + 1}")
            edges.append(f"  up{number + 1} --> up{number}")

    mid = [t for t in transitions if t.step.section is Section.MID]
    segments = sorted({t.step.group for t in mid})
    segment_ops = [t.step.op.value for t in mid if t.step.group == segments[0]]
    shared = " (shared weights)" if plan.spec.mid.share_weights and len(segments) > 1 else ""
    mid_text = [f"mid · {mid[0].out_shape[0]} ch · {_spatial(mid[0].out_shape)}",
                f"{len(segments)}× [{' → '.join(segment_ops)}]{shared}"]
    lines.append(f'  space mid["{"<br/>".join(mid_text)}"] space')
    classify("mid", mid)
    edges += [f"  down{levels} --> mid", f"  mid --> up{levels}", "  up1 --> head"]

    lines += edges
    lines.append("  classDef attention fill:#ffe0b2,color:#000")
    lines += [f"  classDef {name} {style}" for name, style, _, _ in _FUSION_STYLES.values()]
    lines += [f"  class {','.join(nodes)} {name}" for name, nodes in classes.items()]
    return "\n".join(lines) + "\n"


def unet_legend(plan: Plan) -> str:
    """One Markdown line saying what the highlights of [`unet_diagram`][cpcbm_blocks.diagram.unet_diagram] mean."""
    ops = {t.step.op for t in plan.transitions}
    parts = ["orange fill: self-attention"] if Op.ATTN in ops else []
    parts += [f"{colour}: {meaning} (`{op.value}`)" for op, (_, _, colour, meaning) in _FUSION_STYLES.items()
              if op in ops]
    return "Legend: " + "; ".join(parts) + "." if parts else ""


def parameter_counts(spec: UNetSpec) -> dict[str, int]:
    """Parameters of each module of `spec`'s UNet, by `module_key`, plus `"time_embedding"`.

    The UNet is built on PyTorch's `meta` device: shapes only, no memory, no initialisation cost.
    """
    from cpcbm_blocks.unet import UNet3D  # the UNet imports the blocks; keep `import diagram` light

    with torch.device("meta"):
        model = UNet3D(spec)
    counts = {key: sum(p.numel() for p in block.parameters()) for key, block in model.blocks.items()}
    counts["time_embedding"] = sum(p.numel() for p in model.time_embedding.parameters())
    return counts


def transition_table(plan: Plan, counts: Mapping[str, int]) -> str:
    """A Markdown table of every transition: where, op, input (+ skip), output, parameters.

    `counts` is [`parameter_counts`][cpcbm_blocks.diagram.parameter_counts]`(plan.spec)`. A module
    that runs more than once (middle segments with shared weights) is counted at its first step
    only, so the column sums to the model's parameters minus the timestep embedding, which the last
    line adds.
    """
    rows = ["| # | where | op | input (+ skip) | output | parameters |", "|---:|---|---|---|---|---:|"]
    seen: set[str] = set()
    total = 0
    for number, t in enumerate(plan.transitions, start=1):
        key = t.step.module_key
        if key in seen:
            params = f"shared with `{key}`"
        else:
            seen.add(key)
            total += counts[key]
            params = f"{counts[key]:,}"
        source = _shape(t.in_shape) + (f" + {_shape(t.skip_shape)}" if t.skip_shape else "")
        rows.append(f"| {number} | {t.step.describe()} | `{t.step.op.value}` | {source} | "
                    f"{_shape(t.out_shape)} | {params} |")
    total += counts["time_embedding"]
    rows.append(f"| | timestep embedding (feeds every `res`) | | | | {counts['time_embedding']:,} |")
    rows.append(f"| | **total** | | | | **{total:,}** |")
    return "\n".join(rows) + "\n"


# ---- single blocks, traced with torch.fx ----------------------------------------------------

_OPAQUE: dict[str, Callable] = {
    "rearrange": rearrange,
    "timesteps_to_batch": timesteps_to_batch,
    "sinusoidal_embedding": sinusoidal_embedding,
    "conv3d": conv3d,
    "upsample_conv3d": upsample_conv3d,
}
"""Functions a block's `forward` calls that fx cannot trace through; each becomes one node."""


def _as_node(name: str, fn: Callable) -> Callable:
    def traced(*args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs, name=name)

    return traced


@contextmanager
def _opaque_functions(module: nn.Module) -> Iterator[None]:
    """Replace the opaque functions in the globals of every `forward` under `module` while tracing."""
    patched: list[tuple[dict, str, Any]] = []
    try:
        for sub in module.modules():
            namespace = inspect.unwrap(type(sub).forward).__globals__
            for name, fn in _OPAQUE.items():
                if namespace.get(name) is fn:
                    patched.append((namespace, name, fn))
                    namespace[name] = _as_node(name, fn)
        yield
    finally:
        for namespace, name, fn in reversed(patched):
            namespace[name] = fn


class _BlockTracer(torch.fx.Tracer):
    """Stops at our `Conv3d` (its 2-D fast path is an implementation detail, not data flow)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Conv3d) or super().is_leaf_module(m, module_qualified_name)


def _tensor_shapes(meta: Any) -> list[tuple[int, ...]]:
    if isinstance(meta, TensorMetadata):
        return [tuple(meta.shape)]
    if isinstance(meta, (tuple, list)):
        return [shape for item in meta for shape in _tensor_shapes(item)]
    return []


_FUNCTION_LABELS = {operator.add: "+", operator.sub: "−", operator.mul: "×", operator.getitem: "index", torch.cat: "concatenate"}


def _label(node: torch.fx.Node, module: nn.Module) -> str:
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        text = f"{node.target.removeprefix('block.')}: {type(sub).__name__}"
        if isinstance(sub, nn.Conv3d):
            text += f" {'×'.join(map(str, sub.kernel_size))}"
            text += f", stride {'×'.join(map(str, sub.stride))}" if sub.stride != (1, 1, 1) else ""
        return text
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "get_attr":
        return f"parameter {node.target}"
    if node.target is rearrange:
        return f"rearrange '{node.args[1]}'"
    return _FUNCTION_LABELS.get(node.target, getattr(node.target, "__name__", str(node.target)))


class _Bound(nn.Module):
    """A root for tracing: calls `block` with the example's positional tensors and fixed keywords.

    fx cannot trace a root `forward` with keyword-only parameters through a wrapper such as
    `shape_checked`; as a submodule the block is called normally, so any signature works.
    """

    def __init__(self, block: nn.Module, keywords: Mapping[str, Any]) -> None:
        super().__init__()
        self.block = block
        self.keywords = dict(keywords)


class _Bound1(_Bound):
    def forward(self, a):
        return self.block(a, **self.keywords)


class _Bound2(_Bound):
    def forward(self, a, b):
        return self.block(a, b, **self.keywords)


class _Bound3(_Bound):
    def forward(self, a, b, c):
        return self.block(a, b, c, **self.keywords)


class _Bound4(_Bound):
    def forward(self, a, b, c, d):
        return self.block(a, b, c, d, **self.keywords)


_BOUND = {1: _Bound1, 2: _Bound2, 3: _Bound3, 4: _Bound4}


def block_diagram(module: nn.Module, *args: Any, **keywords: Any) -> str:
    """The data flow of `module.forward` as a Mermaid flowchart, traced by `torch.fx`.

    `args` are example inputs for `forward`'s positional parameters (1 to 4); they run once through
    the traced graph to label every tensor with its shape. `keywords` are passed to `forward` as
    constants (such as `batch_size=None`). Only tensor-valued nodes are drawn: integer bookkeeping
    (sizes read from `x.shape`) is left out.
    """
    if len(args) not in _BOUND:
        raise ValueError(f"args: expected 1 to 4 example inputs, got {len(args)}.")
    names = list(inspect.signature(inspect.unwrap(type(module).forward)).parameters)[1:]
    root = _BOUND[len(args)](module, keywords)
    with _opaque_functions(module):
        graph = _BlockTracer().trace(root)
    traced = torch.fx.GraphModule(root, graph)
    ShapeProp(traced).propagate(*args)

    ids: dict[torch.fx.Node, str] = {}
    placeholders = iter(names)
    lines = ["flowchart TD"]
    for node in traced.graph.nodes:
        if node.op == "output":
            sources = [ids[n] for n in node.all_input_nodes if n in ids]
            lines.append('  output(["output"])')
            lines += [f"  {s} --> output" for s in sources]
            continue
        label = f"input {next(placeholders)}" if node.op == "placeholder" else _label(node, root)
        shapes = _tensor_shapes(node.meta.get("tensor_meta"))
        if not shapes:
            continue
        ids[node] = f"n{len(ids)}"
        text = f"{label.removeprefix('block.')}<br/>{' | '.join(_shape(s) for s in shapes)}".replace('"', "'")
        shape_open, shape_close = ('(["', '"])') if node.op == "placeholder" else ('["', '"]')
        lines.append(f"  {ids[node]}{shape_open}{text}{shape_close}")
        lines += [f"  {ids[n]} --> {ids[node]}" for n in node.all_input_nodes if n in ids]
    return "\n".join(lines) + "\n"
