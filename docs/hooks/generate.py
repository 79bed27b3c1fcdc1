"""MkDocs hook: replace `<!-- cpcbm:... -->` markers with figures and tables generated from the code.

Nothing the markers produce is written by hand, so the site cannot drift from the package:

* `<!-- cpcbm:unet-diagram -->`: the U-shaped diagram of `UNetSpec.default()` at the nominal input
  (`cpcbm_blocks.diagram.unet_diagram`) and its legend; `<!-- cpcbm:unet-diagram conditioned -->`
  draws `UNetSpec.conditioned()` instead.
* `<!-- cpcbm:fusion-sites conditioned -->`: every fusion step of a spec, with its parameters.
* `<!-- cpcbm:seed-vs-code -->`: the seed's `h:` trace (parsed from `architecture/seed-trace.md`)
  beside the trace rendered from the plan, and the result of comparing both with the trace recorded
  by running `UNet3D` on the `meta` device. A mismatch is logged as a warning, which fails
  `mkdocs build --strict`.
* `<!-- cpcbm:transition-table -->`: every transition with its shapes and parameters.
* `<!-- cpcbm:block-diagram -->`: on a block page, runs the page's ```python blocks above the
  marker (they must define `block` and `inputs`, a tuple of example inputs, and may define
  `keywords`), then draws `block`'s traced data flow and prints its `forward` signature.
* `<!-- cpcbm:default-spec-json -->`: `UNetSpec.default().to_json()`.
* `<!-- cpcbm:attention-cost -->`, `<!-- cpcbm:planar-kernel-savings -->`,
  `<!-- cpcbm:depth-padding -->`: the performance page's tables, computed from the plan and from a
  `meta`-device forward.

An unknown marker is an error, so a typo cannot leave a silent hole in a page.

Notebooks: mkdocs-jupyter executes them during the build. When `CPCBM_EXECUTED_NOTEBOOKS` names a
folder of already-executed copies (the test suite executes each notebook once, as a test, and then
builds the site), those copies are rendered instead of running every notebook a second time.
nbconvert's template also carries a loader that would import mermaid from a CDN if a notebook
contained a mermaid cell; ours never do, and the loader is removed from the built pages so that no
page refers to a CDN at all.
"""

import inspect
import logging
import math
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from cpcbm_blocks import Op, Section, UNet3D, UNetSpec, parse_trace, plan, record_trace, render_trace
from cpcbm_blocks.diagram import block_diagram, parameter_counts, transition_table, unet_diagram, unet_legend

log = logging.getLogger("mkdocs.hooks.cpcbm")

NOMINAL_INPUT = (1, 1, 8, 256, 256)
_MARKER = re.compile(r"<!--\s*cpcbm:(?P<name>[\w-]+)(?:\s+(?P<argument>[\w-]+))?\s*-->")
_SPECS = {"default": UNetSpec.default, "conditioned": UNetSpec.conditioned}
"""The specs a marker may name: `<!-- cpcbm:unet-diagram conditioned -->`; the default when none is named."""
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _mermaid(text: str) -> str:
    return f"```mermaid\n{text}```\n"


def _seed_trace(docs_dir: Path) -> str:
    page = (docs_dir / "architecture" / "seed-trace.md").read_text()
    return re.search(r"```text\n(.*?)```", page, re.DOTALL).group(1)


def _seed_vs_code(docs_dir: Path) -> str:
    spec = UNetSpec.default()
    planned = plan(spec, NOMINAL_INPUT)
    seed_text = _seed_trace(docs_dir)
    seed_keys = parse_trace(seed_text)
    planned_keys = [t.key() for t in planned.seed_transitions()]
    with torch.device("meta"):
        model = UNet3D(spec)
    started = time.perf_counter()
    with record_trace(model) as recorded, torch.no_grad():
        model(torch.empty(NOMINAL_INPUT, device="meta"), 500)
    seconds = time.perf_counter() - started
    recorded_keys = [t.key() for t in recorded.transitions if not t.step.beyond_seed]
    agree_plan = seed_keys == planned_keys
    agree_run = seed_keys == recorded_keys
    ok = agree_plan and agree_run
    if not ok:
        log.warning("architecture page: the seed's h: trace differs from the code (plan agrees: %s, "
                    "recorded run agrees: %s)", agree_plan, agree_run)
    matching = sum(a == b for a, b in zip(seed_keys, recorded_keys))
    verdict = ('!!! success "Verified at build time: the seed\'s trace equals the code"\n'
               if ok else '!!! failure "The seed\'s trace DIFFERS from the code"\n')
    verdict += (f"    The seed's trace, parsed with `parse_trace`, has {len(seed_keys)} transitions. They "
                f"{'equal' if agree_plan else 'do NOT equal'} `plan(UNetSpec.default(), {NOMINAL_INPUT})` "
                f"and {'equal' if agree_run else 'do NOT equal'} the trace recorded by running `UNet3D` "
                f"on the `meta` device ({matching} of {len(recorded_keys)} recorded transitions match; "
                f"the forward took {seconds:.2f} s). The output head, the one step beyond the seed's "
                "trace, is the last row of the table below. `cpcbm-blocks trace --expect "
                "docs/architecture/seed-trace.md` makes the same check from the command line.\n")
    rendered = render_trace(planned, include_head=False)
    return (f"{verdict}\n"
            '<div class="grid" markdown>\n\n'
            '<div markdown>\n\n**The seed (`CPC_BM_model.md`, verbatim)**\n\n'
            f"```text\n{seed_text}```\n\n</div>\n\n"
            '<div markdown>\n\n**Rendered from the code (`render_trace(plan(...))`)**\n\n'
            f"```text\n{rendered}\n```\n\n</div>\n\n</div>\n")


def _signature(function) -> str:
    function = inspect.unwrap(function)
    parameters = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name == "self":
            continue
        text = name if parameter.annotation is inspect.Parameter.empty else f"{name}: {_annotation(parameter.annotation)}"
        parameters.append(text)
    returns = inspect.signature(function).return_annotation
    body = ",\n    ".join(parameters)
    return f"def forward(\n    {body},\n) -> {_annotation(returns)}"


def _annotation(annotation) -> str:
    return inspect.formatannotation(annotation).replace("torch.Tensor", "Tensor")


def _block_diagram(page_markdown: str, marker_at: int, where: str) -> str:
    namespace: dict = {}
    for code in _PYTHON_BLOCK.findall(page_markdown[:marker_at]):
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the page's own example, run at every build
    if "block" not in namespace or "inputs" not in namespace:
        raise ValueError(f"{where}: the python blocks above <!-- cpcbm:block-diagram --> must define "
                         "`block` and `inputs` (a tuple of example inputs).")
    block, inputs = namespace["block"], namespace["inputs"]
    diagram = block_diagram(block, *inputs, **namespace.get("keywords", {}))
    return ("**Data flow of `forward`**, traced with `torch.fx` from the example above (shapes are those "
            "of the example):\n\n" + _mermaid(diagram) +
            "\n**Shape contract** (the annotations of `forward`, checked at run time):\n\n"
            f"```python\n{_signature(type(block).forward)}\n```\n")


def _fusion_sites(spec: UNetSpec) -> str:
    """Every fusion step of `spec` at the nominal input, with the parameters of its module."""
    counts = parameter_counts(spec)
    rows = ["| where | step | fusion | shape (C,D,H,W) | parameters |", "|---|---|---|---|---:|"]
    for t in plan(spec, NOMINAL_INPUT).transitions:
        if t.step.op.is_fusion:
            rows.append(f"| {t.step.describe()} | `{t.step.module_key}` | `{t.step.op.value}` | "
                        f"{','.join(map(str, t.out_shape))} | {counts[t.step.module_key]:,} |")
    with torch.device("meta"):
        conditioner = UNet3D(spec).conditioner
    encoder = sum(p.numel() for p in conditioner.parameters())
    return ("\n".join(rows) + f"\n\nThe condition encoder (`model.conditioner`: conditional-image encoder, gated "
            f"text-image fusion per site, null text, token projections) has {encoder:,} parameters.\n")


def _attention_cost() -> str:
    spec = UNetSpec.default()
    transitions = plan(spec, NOMINAL_INPUT).transitions
    rows = ["| where | channels | D×H×W | tokens n | heads | score matrix (float32, 1 sample) | attention in the default |",
            "|---|---:|---|---:|---:|---:|---|"]
    sites = [(f"level {number}", number, spec.levels[number - 1].attention) for number in range(1, len(spec.levels) + 1)]
    sites.append(("bottleneck", None, spec.mid.attention))
    for name, number, used in sites:
        section = Section.MID if number is None else Section.DOWN
        first = next(t for t in transitions if t.step.section is section and t.step.group == (number or 1)
                     and t.step.op is Op.RES)
        channels, d, h, w = first.out_shape
        tokens, heads = d * h * w, channels // spec.head_channels
        rows.append(f"| {name} | {channels} | {d}×{h}×{w} | {tokens:,} | {heads} | {_bytes(4 * heads * tokens**2)} "
                    f"| {'yes' if used else 'no'} |")
    return "\n".join(rows) + "\n"


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _convolutions(model: UNet3D) -> list[tuple[torch.nn.Conv3d, int, torch.Size]]:
    """Every `Conv3d` call of one forward of a `meta`-device `model` at the nominal input: (module, input
    depth, output shape)."""
    calls = []

    def record(module, inputs, output):
        calls.append((module, inputs[0].shape[2], output.shape))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        model(torch.empty(NOMINAL_INPUT, device="meta"), 500)
    for hook in hooks:
        hook.remove()
    return calls


def _meta_model(spec: UNetSpec) -> UNet3D:
    with torch.device("meta"):
        return UNet3D(spec)


def _macs(module: torch.nn.Conv3d, output: torch.Size) -> int:
    return output.numel() * module.in_channels * math.prod(module.kernel_size) // module.groups


def _conv_cost(spec: UNetSpec) -> tuple[int, int]:
    """(multiply-accumulates of every convolution in one forward, convolution parameters) on `meta`."""
    model = _meta_model(spec)
    params = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Conv3d) for p in m.parameters())
    return sum(_macs(module, output) for module, _, output in _convolutions(model)), params


def _planar_kernel_savings() -> str:
    planar = _conv_cost(UNetSpec.default())
    cubic = _conv_cost(UNetSpec.default(planar_kernels_where_depth_is_one=False))
    rows = ["| default UNet, input (1, 1, 8, 256, 256) | `(1, 3, 3)` where depth is 1 (default) | `(3, 3, 3)` everywhere | ratio |",
            "|---|---:|---:|---:|",
            (f"| convolution multiply-accumulates per forward | {planar[0] / 1e9:,.2f} G | {cubic[0] / 1e9:,.2f} G "
             f"| {planar[0] / cubic[0]:.2f} |"),
            f"| convolution parameters | {planar[1]:,} | {cubic[1]:,} | {planar[1] / cubic[1]:.2f} |"]
    return ("Counted at build time by running both UNets on the `meta` device with a hook on every "
            "convolution (multiply-accumulates = output elements × input channels × kernel volume):\n\n"
            + "\n".join(rows) + "\n")


def depth_pairs(module: torch.nn.Conv3d, depth: int, depth_out: int) -> tuple[int, int, int]:
    """For a convolution of a `depth`-slice input: its (output slice, depth tap) pairs, those whose tap
    falls on the zero padding, and how many pairs' worth of multiply-accumulates `Conv3d` runs. A folded
    convolution runs every (output slice, input slice) block instead: at 2 slices each is a real tap,
    at 3 the corner blocks are zeros, as many as the 3-D kernel's padded pairs."""
    taps, stride, pad = module.kernel_size[0], module.stride[0], module.padding[0]
    padded = sum(1 for o in range(depth_out) for t in range(taps) if not 0 <= o * stride + t - pad < depth)
    computed = depth_out * depth if module.folds(depth) else depth_out * taps
    return depth_out * taps, padded, computed


def _depth_padding() -> str:
    """Per input depth and kernel of the default's convolutions: the multiply-accumulates a 3-D kernel
    spends on the zero padding in depth, and how many of them the library's exact forms still compute."""
    groups: dict[tuple, Counter] = defaultdict(Counter)
    for module, depth, output in _convolutions(_meta_model(UNetSpec.default())):
        pairs, padded, computed = depth_pairs(module, depth, output[2])
        per_pair = _macs(module, output) // pairs
        group = groups[(depth, module.kernel_size, module.stride)]
        group["convolutions"] += 1
        group["macs"] += per_pair * pairs
        group["padding"] += per_pair * padded
        group["still computed"] += per_pair * (computed - (pairs - padded))  # beyond the useful pairs
    total = sum(groups.values(), Counter())
    rows = ["| input depth | kernel | stride | convolutions | MACs per forward | on depth padding | still computed |",
            "|---:|---|---|---:|---:|---:|---:|"]
    for (depth, kernel, stride), group in sorted(groups.items(), key=lambda item: -item[0][0]):
        rows.append(f"| {depth} | {'x'.join(map(str, kernel))} | {'x'.join(map(str, stride))} "
                    f"| {group['convolutions']} | {group['macs'] / 1e9:,.2f} G | {group['padding'] / 1e9:,.2f} G "
                    f"| {group['still computed'] / 1e9:,.2f} G |")
    rows.append(f"| all | | | {total['convolutions']} | {total['macs'] / 1e9:,.2f} G | {total['padding'] / 1e9:,.2f} G "
                f"| {total['still computed'] / 1e9:,.2f} G ({total['still computed'] / total['macs']:.1%}) |")
    return ("Counted at build time for `UNetSpec.default()` at the nominal input, from every `Conv3d` call of a "
            "`meta`-device forward (the input gradient and the weight gradient repeat the same pairs):\n\n"
            + "\n".join(rows) + "\n")


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"])
    where = page.file.src_uri

    def replace(match: re.Match) -> str:
        name, argument = match.group("name"), match.group("argument") or "default"
        if argument not in _SPECS:
            raise ValueError(f"{where}: <!-- cpcbm:{name} {argument} -->: unknown spec {argument!r}, "
                             f"expected one of {sorted(_SPECS)}")
        if name == "unet-diagram":
            planned = plan(_SPECS[argument](), NOMINAL_INPUT)
            return _mermaid(unet_diagram(planned)) + "\n" + unet_legend(planned) + "\n"
        if name == "fusion-sites":
            return _fusion_sites(_SPECS[argument]())
        if name == "seed-vs-code":
            return _seed_vs_code(docs_dir)
        if name == "transition-table":
            spec = UNetSpec.default()
            return transition_table(plan(spec, NOMINAL_INPUT), parameter_counts(spec))
        if name == "block-diagram":
            return _block_diagram(markdown, match.start(), where)
        if name == "attention-cost":
            return _attention_cost()
        if name == "planar-kernel-savings":
            return _planar_kernel_savings()
        if name == "depth-padding":
            return _depth_padding()
        if name == "default-spec-json":
            return f"```json\n{UNetSpec.default().to_json()}\n```\n"
        raise ValueError(f"{where}: unknown marker <!-- cpcbm:{name} -->")

    return _MARKER.sub(replace, markdown)


EXECUTED_NOTEBOOKS_ENV = "CPCBM_EXECUTED_NOTEBOOKS"
_NBCONVERT_MERMAID_LOADER = re.compile(
    r'<script type="module">\s*document\.addEventListener\("DOMContentLoaded", async \(\) => \{\s*'
    r'const diagrams = document\.querySelectorAll\("\.jp-Mermaid.*?</script>', re.DOTALL)
_EMPTY_SCRIPT = '<script src=""> </script>'


def _executed_dir() -> Path | None:
    folder = os.environ.get(EXECUTED_NOTEBOOKS_ENV)
    return Path(folder) if folder else None


def on_config(config):
    if _executed_dir() is not None:
        # Render the executed copies as they are; their temporary paths would only fill the cache.
        config.plugins["mkdocs-jupyter"].config["execute"] = False
        config.plugins["mkdocs-jupyter"].config["cache"] = False
    return config


def on_files(files, config):
    folder = _executed_dir()
    if folder is None:
        return files
    for file in files:
        if file.src_uri.startswith("notebooks/") and file.src_uri.endswith(".ipynb"):
            executed = folder / Path(file.src_uri).name
            if not executed.is_file():
                raise FileNotFoundError(f"{EXECUTED_NOTEBOOKS_ENV}={folder}: no executed copy of {file.src_uri}")
            file.abs_src_path = str(executed)
    return files


def on_post_page(output: str, page, config) -> str:
    if not page.file.src_uri.endswith(".ipynb"):
        return output
    output = _NBCONVERT_MERMAID_LOADER.sub("", output).replace(_EMPTY_SCRIPT, "")
    if "cdnjs.cloudflare.com" in output:
        log.warning("%s: nbconvert's CDN mermaid loader is still in the page; update the pattern in %s",
                    page.file.src_uri, __file__)
    return output
