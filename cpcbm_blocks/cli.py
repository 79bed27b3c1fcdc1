"""The `cpcbm-blocks` command line (also `python -m cpcbm_blocks`).

`cpcbm-blocks trace` builds a UNet from a spec (the documented default unless `--spec` is given),
runs it on PyTorch's `meta` device (or a real device with `--device cpu`), and prints every
transition in the seed's `h:` notation with the actual shapes next to the expected ones. It exits 0
only when all of them agree (and, with `--expect`, when they also equal a documented trace).

`cpcbm-blocks plan` runs one training step of the same UNet on `meta` and prints, per transition and
in total, parameters, FLOPs, activations saved for backward and the predicted peak memory
(`memory_plan`); `--fit-gib N` also gives the largest batch that fits.
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cpcbm_blocks.errors import CpcbmError, InputError
from cpcbm_blocks.malloc import glibc
from cpcbm_blocks.measure import rss_bytes
from cpcbm_blocks.memory import DEVICES, DTYPES, memory_plan
from cpcbm_blocks.notation import parse_trace, render_trace
from cpcbm_blocks.plan import plan
from cpcbm_blocks.spec import UNetSpec
from cpcbm_blocks.trace import record_trace
from cpcbm_blocks.unet import UNet3D

__all__ = ["main"]

DEFAULT_INPUT_SHAPE = (1, 1, 8, 256, 256)


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,C,D,H,W integers such as 1,1,8,256,256, got {text!r}") from None
    if len(shape) != 5:
        raise argparse.ArgumentTypeError(f"expected 5 comma-separated integers B,C,D,H,W, got {len(shape)} in {text!r}")
    return shape


PRESETS = {"default": UNetSpec.default, "conditioned": UNetSpec.conditioned}
TEXT_TOKENS = 77  # CLIP's context length, for the synthetic text of a conditioned trace


def _load_spec(source: str | None) -> tuple[UNetSpec, str]:
    if source is None or source in PRESETS:
        name = source or "default"
        return PRESETS[name](), f"UNetSpec.{name}()"
    if not Path(source).is_file():
        problem = "a directory" if Path(source).is_dir() else "neither a preset nor an existing file"
        raise InputError(f"--spec: expected {' or '.join(PRESETS)} or a JSON file written by UNetSpec.to_json(), "
                         f"got {source!r}, {problem}. Check the spelling, or pass the file's path.")
    return UNetSpec.from_json(Path(source).read_text()), source


def _trace_device(text: str) -> torch.device:
    """`--device` of `trace`: a device torch knows and this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected 'meta', 'cpu' or 'cuda[:N]', got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"expected a device this machine has, got {text!r}, but torch sees no CUDA "
                                         "device here. Use 'meta' (shapes only) or 'cpu'.")
    if device.type not in ("meta", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected 'meta', 'cpu' or 'cuda[:N]', got {text!r}")
    return device


def _synthetic_conditions(spec: UNetSpec, input_shape: tuple[int, ...], device: torch.device) -> dict:
    """Conditions of the right shapes for a conditioned spec (values do not matter for a shape trace)."""
    cond = spec.conditioning
    if cond is None:
        return {}
    make = torch.randn if device.type != "meta" else torch.empty
    batch = input_shape[0]
    conditions = {}
    if cond.has_text:
        conditions["text"] = make(batch, TEXT_TOKENS, cond.text_channels, device=device)
    if cond.has_images:
        conditions["cond_images"] = make(batch, cond.image_channels, *input_shape[2:], device=device)
    return conditions


def _expected_keys(path: str) -> list[tuple]:
    text = Path(path).read_text()
    if "```" in text:  # a Markdown page: take the fenced block that holds the trace
        blocks = text.split("```")[1::2]
        text = next((b.split("\n", 1)[1] for b in blocks if "Down-{" in b), text)
    return parse_trace(text)


def _shape_text(shape) -> str:
    return ",".join(map(str, shape)) if shape else ""


def _warm_up_meta_kernels() -> float:
    """Trigger torch's one-time lazy import of its meta kernels (about 1.5 s), so it is timed apart."""
    started = time.perf_counter()
    q = torch.empty(1, 1, 2, 2, device="meta")
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.nn.functional.conv3d(torch.empty(1, 1, 2, 2, 2, device="meta"), torch.empty(1, 1, 1, 1, 1, device="meta"))
    return time.perf_counter() - started


def trace_command(args: argparse.Namespace) -> int:
    spec, spec_name = _load_spec(args.spec)
    input_shape = tuple(args.input_shape)
    expected = plan(spec, input_shape)
    device = args.device
    if any(t.step.op.is_fusion for t in expected.transitions):
        print(f"note: {spec_name} is conditioned; the trace uses synthetic conditions ({TEXT_TOKENS} text tokens, "
              "conditional images shaped like the input). Fusion steps are shape-preserving additions to the seed "
              "trace.", file=sys.stderr)
    with torch.device(device):
        model = UNet3D(spec).eval()
    x = torch.randn(input_shape, device=device) if device.type != "meta" else torch.empty(input_shape, device=device)
    warm_up_seconds = _warm_up_meta_kernels() if device.type == "meta" else 0.0
    error: CpcbmError | None = None
    started = time.perf_counter()
    conditions = _synthetic_conditions(spec, input_shape, device)
    with record_trace(model) as recorded, torch.no_grad():
        try:
            model(x, 500, **conditions)
        except CpcbmError as caught:
            error = caught
    seconds = time.perf_counter() - started

    rows = []
    for i, want in enumerate(expected.transitions):
        got = recorded.transitions[i] if i < len(recorded.transitions) else None
        rows.append({
            "index": i + 1, "where": want.step.describe(), "section": want.step.section.value,
            "group": want.step.group, "step": want.step.index, "op": want.step.op.value,
            "beyond_seed": want.step.beyond_seed, "expected": want.render(),
            "actual": got.render() if got else None, "ok": got == want,
        })
    agree = sum(r["ok"] for r in rows)
    ok = error is None and agree == len(rows)
    documented = None
    if args.expect:
        documented_keys = _expected_keys(args.expect)
        seed_keys = [t.key() for t in recorded.transitions if not t.step.beyond_seed and not t.step.op.is_fusion]
        if any(t.step.op.is_fusion for t in recorded.transitions):  # compare without the index: fusion shifts it
            documented_keys = [k[:2] + k[3:] for k in documented_keys]
            seed_keys = [k[:2] + k[3:] for k in seed_keys]
        documented = {"file": args.expect, "ok": documented_keys == seed_keys}
        ok = ok and documented["ok"]

    if args.format == "json":
        print(json.dumps({"spec": spec.to_dict(), "spec_source": spec_name, "input_shape": list(input_shape),
                          "device": str(device), "seconds": round(seconds, 4),
                          "torch_meta_import_seconds": round(warm_up_seconds, 4), "transitions": rows,
                          "trace": render_trace(expected), "documented": documented,
                          "error": str(error) if error else None, "ok": ok}, indent=2))
        return 0 if ok else 1

    width = max(len(r["expected"]) for r in rows)
    print(f"cpcbm-blocks trace: {spec_name}, input {input_shape}, device {device}")
    print(f"{'#':>3}  {'where':38} {'expected':{width}}  {'actual':{width}}  ok")
    for r in rows:
        mark = "yes" if r["ok"] else "NO"
        print(f"{r['index']:>3}  {r['where']:38} {r['expected']:{width}}  {(r['actual'] or '-'):{width}}  {mark}")
    print()
    print(render_trace(expected))
    print()
    if error is not None:
        print(f"error: {error}")
    if documented is not None:
        verdict = "equals" if documented["ok"] else "DIFFERS FROM"
        print(f"the recorded trace {verdict} the documented trace in {args.expect}")
    warm = f"; torch's one-time meta-kernel import took {warm_up_seconds:.2f} s before it" if warm_up_seconds else ""
    print(f"{agree}/{len(rows)} transitions agree with the plan (forward {seconds:.2f} s on {device}{warm}).")
    return 0 if ok else 1


def _levels(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated level numbers such as 1,2 (or 'none'), got {text!r}") from None


def _positive_gib(text: str) -> float:
    """`--fit-gib`: a positive, finite number of GiB."""
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not math.isfinite(gib) or gib <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of GiB such as 24, got {text!r}")
    return gib


def _positive_int(text: str) -> int:
    """`--text-tokens`: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer such as {TEXT_TOKENS}, got {text!r}")
    return value


def plan_command(args: argparse.Namespace) -> int:
    spec, spec_name = _load_spec(args.spec)
    if args.checkpoint_conditions and spec.conditioning is None:
        raise InputError(f"--checkpoint-conditions: expected a spec with conditioning (such as --spec conditioned), "
                         f"got {spec_name}, which has none: there is no condition encoder to checkpoint. "
                         "Drop --checkpoint-conditions, or plan a conditioned spec.")
    input_shape = tuple(args.input_shape)
    if args.batch is not None:
        input_shape = (args.batch, *input_shape[1:])
    warm_up_seconds = _warm_up_meta_kernels()
    result = memory_plan(spec, input_shape, dtype=args.dtype, device=args.device,
                         checkpoint_levels=args.checkpoint_levels, checkpoint_mid=args.checkpoint_mid,
                         checkpoint_conditions=args.checkpoint_conditions, selective=args.selective,
                         attention_backend=args.attention, text_tokens=args.text_tokens)
    largest = None if args.fit_gib is None else result.largest_batch(args.fit_gib * 2**30)
    process = rss_bytes() if result.device == "cpu" else None  # Python and torch, which a CPU step's RSS adds
    if args.format == "json":
        print(json.dumps({"spec": spec.to_dict(), "spec_source": spec_name, **result.to_dict(),
                          "fit_gib": args.fit_gib, "largest_batch": largest, "process_rss_bytes": process,
                          "torch_meta_import_seconds": round(warm_up_seconds, 4)}, indent=2))
        return 0
    checkpointing = ", ".join([*(f"level {v}" for v in result.checkpoint_levels), *(["mid"] if result.checkpoint_mid else []),
                               *(["conditions"] if result.checkpoint_conditions else [])])
    print(f"cpcbm-blocks plan: {spec_name}, input {result.input_shape}, {args.dtype} on {args.device}, "
          f"attention {result.attention_backend.value}, "
          f"checkpointing {checkpointing or 'off'}, selective recomputation {'on' if result.selective else 'off'}; a training step (forward, MSE loss, backward, Adam) on meta")
    print(result.render())
    if process is not None:
        kept = (" and what glibc's malloc keeps of freed blocks (cpcbm_blocks.malloc.return_freed_blocks(), or "
                "MALLOC_MMAP_THRESHOLD_=65536, keeps that near zero)" if glibc() is not None else "")
        print(f"on cpu            a process's peak RSS adds Python and torch (this one holds {process / 2**30:.2f} GiB "
              "now; a training process holds more once its first step has run real kernels, whose code it faults in: "
              f"read its RSS after one small step){kept}")
    if largest is not None:
        print(f"largest batch that fits in {args.fit_gib:g} GiB: {largest} (by the {result.device} plan's predicted "
              f"peak; not counted: {result.not_counted})")
    warm = f"; torch's one-time meta-kernel import took {warm_up_seconds:.2f} s before it" if warm_up_seconds > 0.05 else ""
    print(f"planned in {result.planning_seconds:.2f} s{warm}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpcbm-blocks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trace = commands.add_parser("trace", help="run a UNet and check every transition against its plan")
    trace.add_argument("--input-shape", type=_input_shape, default=DEFAULT_INPUT_SHAPE, metavar="B,C,D,H,W",
                       help="input volume shape (default: 1,1,8,256,256)")
    trace.add_argument("--spec", metavar="default|conditioned|FILE.json",
                       help="a preset (UNetSpec.default(), the seed's UNet; or UNetSpec.conditioned(), with text and "
                            "image fusion) or a spec written by UNetSpec.to_json() (default: default)")
    trace.add_argument("--format", choices=("text", "json"), default="text")
    trace.add_argument("--device", type=_trace_device, default="meta", help="'meta' (shapes only, instant; default) or a real device such as 'cpu'")
    trace.add_argument("--expect", metavar="FILE",
                       help="also require the trace to equal a documented h: trace (text or Markdown file)")
    trace.set_defaults(run=trace_command)

    plan_parser = commands.add_parser("plan", help="parameters, FLOPs and training memory per transition, before running")
    plan_parser.add_argument("--input-shape", type=_input_shape, default=DEFAULT_INPUT_SHAPE, metavar="B,C,D,H,W",
                             help="training batch shape (default: 1,1,8,256,256)")
    plan_parser.add_argument("--batch", type=int, help="override the batch size of --input-shape")
    plan_parser.add_argument("--spec", metavar="default|conditioned|FILE.json",
                             help="a preset or a spec written by UNetSpec.to_json() (default: default)")
    plan_parser.add_argument("--text-tokens", type=_positive_int, default=TEXT_TOKENS,
                             help=f"tokens per text condition, for a spec conditioned on text (default: {TEXT_TOKENS})")
    plan_parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                             help="dtype of a model cast with model.to(dtype): parameters, gradients, Adam state "
                                  "and activations all in it (default: fp32). Under torch.autocast, parameters, "
                                  "gradients and Adam state stay fp32, so take those figures from the fp32 plan; "
                                  "autocast itself is not planned")
    plan_parser.add_argument("--device", choices=DEVICES, default="cpu",
                             help="cpu counts oneDNN's blocked copies of convolution operands; cuda counts "
                                  "cuDNN's workspace instead, with the convolution forms a GPU runs (default: cpu)")
    plan_parser.add_argument("--checkpoint-levels", type=_levels, default=(), metavar="L1,L2",
                             help="levels to run with gradient checkpointing, e.g. 1,2 (default: none)")
    plan_parser.add_argument("--checkpoint-mid", action="store_true", help="also checkpoint the middle")
    plan_parser.add_argument("--checkpoint-conditions", action="store_true",
                             help="also checkpoint the condition encoder (conditioned specs)")
    selective = plan_parser.add_mutually_exclusive_group()
    selective.add_argument("--selective", dest="selective", action="store_const", const=True, default=None,
                           help="recompute memory-bound operators in backward (UNet3D's default on the CPU)")
    selective.add_argument("--no-selective", dest="selective", action="store_const", const=False,
                           help="hold every tensor autograd saves, as plain PyTorch does (UNet3D's default on "
                                "a GPU). Without either, as UNet3D trains on --device")
    plan_parser.add_argument("--attention", choices=("sdpa", "naive"), default="sdpa",
                             help="attention backend: fused SDPA (default) or naive (materialises the scores)")
    plan_parser.add_argument("--fit-gib", type=_positive_gib, metavar="N",
                             help="also report the largest batch whose predicted peak on --device fits in N GiB "
                                  "(what a process adds beyond the plan is not counted: leave room for it)")
    plan_parser.add_argument("--format", choices=("text", "json"), default="text")
    plan_parser.set_defaults(run=plan_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CpcbmError, OSError) as error:
        print(f"cpcbm-blocks: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
