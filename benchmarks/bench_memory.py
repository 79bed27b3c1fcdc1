"""Gradient checkpointing (time, saved activations, peak memory) and the planner's accuracy.

1. In one process, alternating after a warm-up: train steps (forward + backward, fp32, batch 1) with
   checkpointing off and on (every level and the middle); and the activations held for backward,
   measured as what glibc malloc holds after a forward with grad minus after one without.
2. Peak memory of a full training step with Adam, each variant in a FRESH process (peak RSS,
   `ru_maxrss`, after two steps), next to the planner's prediction for the same step. The planner
   predicts tensor bytes; the table shows the process's RSS before the model was built too, so the
   two can be compared (`peak RSS - baseline`).

    python benchmarks/bench_memory.py --time-size 128 --peak-size 256 --repeats 3 --peak-specs default,conditioned
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys

import torch

from common import MALLOC_VARIABLES, alternate, median, save, setup, table

from cpcbm_blocks import UNet3D, UNetSpec
from cpcbm_blocks.memory import _conditions, memory_plan

SPECS = {"default": UNetSpec.default, "conditioned": UNetSpec.conditioned}
TEXT_TOKENS = 77

ALL_LEVELS = {"levels": (1, 2, 3, 4), "mid": True, "conditions": True}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(size: int, checkpointing: bool, spec_name: str) -> None:
    """Two training steps with Adam in this fresh process; print peak RSS and the baseline as JSON."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    shape = (1, 1, 8, size, size)
    baseline = rss_bytes()
    spec = SPECS[spec_name]()
    conditions = {k: torch.randn(v.shape) for k, v in _conditions(spec, shape, torch.float32, TEXT_TOKENS).items()}
    model = UNet3D(spec)
    if checkpointing:
        model.set_gradient_checkpointing(**ALL_LEVELS)
    optimizer = torch.optim.Adam(model.parameters())
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t, **conditions), target).backward()
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak}))


def held_for_backward(model, x, t) -> int:
    held = {}
    for grad in (True, False):
        gc.collect()
        before = malloc_in_use()
        with torch.set_grad_enabled(grad):
            out = model(x, t)
        held[grad] = malloc_in_use() - before
        del out
    return held[True] - held[False]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time-size", type=int, default=128)
    parser.add_argument("--peak-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-specs", default="default", help="comma-separated: default, conditioned")
    parser.add_argument("--skip-timing", action="store_true", help="only the fresh-process peak memory part")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "CHECKPOINTING", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1] == "on", args.child[2])
        return
    env = setup()
    tables, data = {}, {}

    if not args.skip_timing:
        tables["checkpointing"], data["checkpointing"] = checkpointing_part(args)
    peak_part(args, tables, data)
    save("memory", env, tables, data)


def checkpointing_part(args):
    shape = (1, 1, 8, args.time_size, args.time_size)
    torch.manual_seed(0)
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])
    plain = UNet3D(UNetSpec.default())
    checkpointed = UNet3D(UNetSpec.default()).set_gradient_checkpointing(**ALL_LEVELS)
    checkpointed.load_state_dict(plain.state_dict())

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x, t), target).backward()
        return run

    times = alternate({"off": step(plain), "on (all levels + mid)": step(checkpointed)}, repeats=args.repeats)
    held = {"off": held_for_backward(plain, x, t), "on (all levels + mid)": held_for_backward(checkpointed, x, t)}
    planned = {"off": memory_plan(UNetSpec.default(), shape),
               "on (all levels + mid)": memory_plan(UNetSpec.default(), shape, checkpoint_levels=(1, 2, 3, 4), checkpoint_mid=True, checkpoint_conditions=True)}
    rows = [[name, median(times[name]), median(times[name]) / median(times["off"]), held[name] / 2**20,
             held["off"] / held[name], planned[name].saved_bytes / 2**20, held[name] / planned[name].saved_bytes]
            for name in times]
    text = table(["checkpointing", "median s", "time / off", "held for backward MiB (measured)", "off / this",
                  "planned MiB", "measured / planned"], rows)
    print(f"\nGradient checkpointing at {shape}, {args.repeats} alternating rounds:\n{text}", flush=True)
    return text, {"shape": shape, "times": times, "held": held,
                  "planned_saved": {k: v.saved_bytes for k, v in planned.items()}}


def peak_part(args, tables, data):
    malloc_free_env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
    rows, peaks = [], {}
    peak_shape = (1, 1, 8, args.peak_size, args.peak_size)
    for spec_name in args.peak_specs.split(","):
        spec = SPECS[spec_name]()
        for name, flag in (("off", "off"), ("on (all levels + mid + conditions)", "on")):
            result = subprocess.run([sys.executable, __file__, "--child", str(args.peak_size), flag, spec_name],
                                    env=malloc_free_env, capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            plan = memory_plan(spec, peak_shape, text_tokens=TEXT_TOKENS,
                               **({"checkpoint_levels": (1, 2, 3, 4), "checkpoint_mid": True, "checkpoint_conditions": True}
                                  if flag == "on" else {}))
            net = measured["peak_rss"] - measured["baseline_rss"]
            peaks[f"{spec_name}, {name}"] = {**measured, "planned_peak": plan.peak_bytes}
            rows.append([f"UNetSpec.{spec_name}()", name, measured["peak_rss"] / 2**30, measured["baseline_rss"] / 2**30,
                         net / 2**30, plan.peak_bytes / 2**30, net / plan.peak_bytes])
            print(f"peak: {rows[-1]}", flush=True)
    text = table(["spec", "checkpointing", "peak RSS GiB", "baseline RSS GiB", "peak - baseline GiB",
                  "planned peak GiB", "measured / planned"], rows)
    print(f"\nPeak memory of a training step with Adam at {peak_shape}, fresh process each, glibc default malloc:\n{text}")
    tables["peak_memory"] = text
    data["peak_memory"] = {"shape": peak_shape, "peaks": peaks}


if __name__ == "__main__":
    main()
