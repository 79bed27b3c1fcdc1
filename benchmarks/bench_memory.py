"""Selective recomputation and gradient checkpointing (time, saved activations, peak memory) and the planner's accuracy.

1. In one process, alternating after a warm-up: train steps (forward + backward, fp32, batch 1) of
   the default UNet as plain PyTorch holds it (`selective=False`), with selective recomputation (the
   default) and with full checkpointing (every level, the middle); and the activations held for
   backward, measured as what freeing a forward's output and graph gives back to glibc malloc, less
   the output (`cpcbm_blocks.measure.held_for_backward`).
2. Peak memory of a full training step with Adam, each variant in a FRESH process over three steps
   (`--peak-steps`; read after each, since under glibc's default it can keep growing), under each
   of glibc's settings in `MALLOC_SETTINGS`: the benchmarks' timing setting (`MALLOC_MMAP_MAX_=0`,
   every freed block kept), glibc's default, and a fixed mmap threshold
   (`MALLOC_MMAP_THRESHOLD_=65536`, which hands every freed tensor back to the system): the peak RSS
   (`VmHWM`; not `ru_maxrss`, which a child inherits from its parent: see `peak_rss_bytes`), two
   baselines (the RSS with torch imported, and after a warm-up step of a throwaway model at 32x32,
   `--warmup-size`, which loads what torch loads on first use), and the most malloc had handed out
   at once (`mallinfo2`, sampled every millisecond; what the allocator merely keeps is not in it).
   The planner's prediction for the same step stands beside them, made in the child after its
   steps, so that it plans the weight-gradient forms the child measured fastest; its accuracy is
   the peak RSS above the warmed-up baseline over it. The checkpointed variant also
   runs with glibc's default environment and the fixed threshold set from Python
   (`cpcbm_blocks.malloc.return_freed_blocks()`).
3. From the same children, what each setting costs in time and saves in memory: the median of two
   more steps (`--timed-steps`, run after the malloc sampler has stopped), over the timing
   setting's, and the peak RSS over the fixed threshold's. A setting cannot be changed back to
   glibc's default inside a process, so these are one fresh process per setting, not alternating
   rounds: read them as the size of the trade, not to a few percent.

    python benchmarks/bench_memory.py --time-size 128 --peak-size 256 --repeats 3 --peak-specs default,conditioned
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from common import MALLOC_VARIABLES, TUNED_MALLOC, alternate, median, save, setup, table

from cpcbm_blocks import UNet3D, UNetSpec, malloc
from cpcbm_blocks.measure import (PeakMallocSampler, file_backed_rss_bytes, held_for_backward, huge_page_bytes,
                                  peak_rss_bytes, rss_bytes)
from cpcbm_blocks.memory import _conditions, memory_plan

SPECS = {"default": UNetSpec.default, "conditioned": UNetSpec.conditioned}
TEXT_TOKENS = 77

SWITCHES = {  # name -> (UNet3D.set_gradient_checkpointing arguments, memory_plan arguments)
    "plain PyTorch (selective off)": ({"selective": False}, {"selective": False}),
    "selective recomputation (default)": ({}, {}),
    "checkpointing (every level + mid + conditions)": (
        {"levels": (1, 2, 3, 4), "mid": True, "conditions": True},
        {"checkpoint_levels": (1, 2, 3, 4), "checkpoint_mid": True, "checkpoint_conditions": True}),
}


def _training(spec: UNetSpec, switches: str, shape: tuple[int, ...]):
    """A model of `spec` with the variant's switches, Adam, a batch and its conditions; and a function
    that runs one training step on them and returns its seconds."""
    conditions = {k: torch.randn(v.shape) for k, v in _conditions(spec, shape, torch.float32, TEXT_TOKENS).items()}
    model = UNet3D(spec).set_gradient_checkpointing(**SWITCHES[switches][0])
    optimizer = torch.optim.Adam(model.parameters())
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])

    def train_step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t, **conditions), target).backward()
        optimizer.step()
        return time.perf_counter() - started

    return model, (x, target, *conditions.values()), train_step


def warmed_up_rss(spec: UNetSpec, switches: str, size: int) -> int | None:
    """The RSS after one training step of a throwaway model (same spec and switches, at `size` x `size`)
    and once it is gone: the process itself after first use, which no plan of a step can count.

    The first step loads what torch loads lazily: building a torch optimizer imports `torch._dynamo`
    (its `add_param_group` is wrapped to keep `torch.compile` out, as `torch.utils.checkpoint` is),
    and with it sympy and some 800 modules; and the first convolutions fault in the pages of
    libtorch's code they run. glibc's `malloc_trim(0)` then hands back the freed blocks
    of the throwaway model (under the timing setting they would stay resident), so that what the
    measured step reuses of them does not hide in this baseline."""
    model, _, train_step = _training(spec, switches, (1, 1, 8, size, size))
    train_step()
    del model, train_step
    gc.collect()
    libc = malloc.glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return rss_bytes()


def child(size: int, switches: str, spec_name: str, malloc_call: str, steps: int, timed_steps: int,
          warmup_size: int) -> None:
    """`steps` training steps with Adam in this fresh process, then `timed_steps` more; print peak RSS
    (after each of the first), malloc peak, baselines and the later steps' times as JSON.

    `malloc_call` names a `cpcbm_blocks.malloc` function to call first ("-": none). Two baselines come
    first: the RSS with torch imported, and (`warmup_size` > 0) after a warm-up step at that size
    (`warmed_up_rss`). The peak RSS is read after every step: the second holds Adam's state, and
    under glibc's default malloc the heap fragments, so the peak can keep growing after that. The
    timed steps run after the malloc sampler has stopped: its thread polls `mallinfo2`, which walks
    the heap's free lists, and slowed steps under glibc's default by a fifth in a check at 128x128,
    under a fixed threshold far less. The file-backed part of the RSS (`file_backed_rss_bytes`: code
    pages of the libraries, not tensors) is read at each baseline and after the steps."""
    if malloc_call != "-":
        getattr(malloc, malloc_call)()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    shape = (1, 1, 8, size, size)
    baseline, file_backed = rss_bytes(), {"baseline": file_backed_rss_bytes()}
    spec = SPECS[spec_name]()
    warmed = warmed_up_rss(spec, switches, warmup_size) if warmup_size else None
    if warmed is not None:
        file_backed["warmed"] = file_backed_rss_bytes()
    model, inputs, train_step = _training(spec, switches, shape)
    peak_by_step, huge_pages_by_step = [], []
    with PeakMallocSampler() as sampler:
        for _ in range(steps):
            train_step()
            peak_by_step.append(peak_rss_bytes())
            huge_pages_by_step.append(huge_page_bytes())  # the parameters and Adam's state are alive
    peak = peak_by_step[-1]
    file_backed["after_steps"] = file_backed_rss_bytes()
    seconds_by_step = [train_step() for _ in range(timed_steps)]
    # Before the first step malloc held the parameters and the inputs, which the plan counts too.
    tensors_before = sum(t.numel() * t.element_size() for t in (*model.parameters(), *inputs))
    planned = memory_plan(spec, shape, text_tokens=TEXT_TOKENS, **SWITCHES[switches][1]).peak_bytes
    print(json.dumps({"baseline_rss": baseline, "warmed_rss": warmed, "peak_rss": peak,
                      "peak_rss_by_step": peak_by_step, "huge_pages_by_step": huge_pages_by_step,
                      "file_backed_rss": file_backed, "seconds_by_step": seconds_by_step, "planned_peak": planned,
                      "malloc_peak_step": sampler.peak_bytes - sampler.start_bytes + tensors_before}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time-size", type=int, default=128)
    parser.add_argument("--peak-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-specs", default="default", help="comma-separated: default, conditioned")
    parser.add_argument("--skip-timing", action="store_true", help="only the fresh-process peak memory part")
    parser.add_argument("--peak-switches", default=",".join(SWITCHES),
                        help="comma-separated names of the variants whose peak to measure (default: all)")
    parser.add_argument("--peak-steps", type=int, default=3, help="training steps per fresh process, for the peak")
    parser.add_argument("--timed-steps", type=int, default=2,
                        help="training steps per fresh process after those, for the step time")
    parser.add_argument("--peak-mallocs", default="",
                        help="comma-separated names of the malloc settings to run (default: all; see MALLOC_SETTINGS)")
    parser.add_argument("--warmup-size", type=int, default=32,
                        help="height and width of the warm-up step each fresh process runs before its baseline "
                             "(0: none)")
    parser.add_argument("--child", nargs=7, metavar=("SIZE", "SWITCHES", "SPEC", "MALLOC_CALL", "STEPS", "TIMED_STEPS",
                                                     "WARMUP_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, switches, spec, call, steps, timed_steps, warmup_size = args.child
        child(int(size), switches, spec, call, int(steps), int(timed_steps), int(warmup_size))
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
    model = UNet3D(UNetSpec.default())

    def step(switches):
        def run():
            model.set_gradient_checkpointing(**switches)
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x, t), target).backward()
        return run

    times = alternate({name: step(switches) for name, (switches, _) in SWITCHES.items()}, repeats=args.repeats)
    held, planned = {}, {}
    for name, (switches, plan_arguments) in SWITCHES.items():
        held[name] = held_for_backward(model.set_gradient_checkpointing(**switches), x, t)
        planned[name] = memory_plan(UNetSpec.default(), shape, **plan_arguments).saved_bytes
    plain = next(iter(SWITCHES))
    rows = [[name, median(times[name]), median(times[name]) / median(times[plain]), held[name] / 2**20,
             held[plain] / held[name], planned[name] / 2**20, held[name] / planned[name]] for name in times]
    text = table(["variant", "median s", "time / plain", "held for backward MiB (measured)", "plain / this",
                  "planned MiB", "measured / planned"], rows)
    print(f"\nSelective recomputation and checkpointing at {shape}, {args.repeats} alternating rounds:\n{text}",
          flush=True)
    return text, {"shape": shape, "times": times, "held": held, "planned_saved": planned}


TIMING_SETTING = "MALLOC_MMAP_MAX_=0 (the timing setting)"
FIXED_THRESHOLD = "MALLOC_MMAP_THRESHOLD_=65536"
MALLOC_SETTINGS = {  # name -> (environment, cpcbm_blocks.malloc function the child calls first, variants)
    TIMING_SETTING: (TUNED_MALLOC, "-", None),
    "glibc default": ({}, "-", None),
    FIXED_THRESHOLD: ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "-", None),
    "return_freed_blocks() in Python": ({}, "return_freed_blocks", ("checkpointing (every level + mid + conditions)",)),
}
"""Every block from a heap that is kept (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`, what
the other benchmarks time under); glibc's default, which raises its mmap threshold as large blocks
are freed (up to 32 MiB) and then keeps freed activations in its heap; a fixed threshold, which
returns every block of 64 KiB or more on free. The fourth sets the same threshold from Python after
start-up (`cpcbm_blocks.malloc`), for the variant that needs it most."""


ALLOCATION_VARIABLES = (*MALLOC_VARIABLES, "THP_MEM_ALLOC_ENABLE")
"""What a child gets only from its setting, never from the parent's environment."""


def run_child(size: int, variant: str, spec: str, *, environment: dict[str, str], malloc_call: str = "-",
              steps: int, timed_steps: int, warmup_size: int = 0) -> dict:
    """`child(...)` in a fresh process whose allocator settings are exactly `environment`; its JSON as a dict."""
    clean = {k: v for k, v in os.environ.items() if k not in ALLOCATION_VARIABLES}
    command = [sys.executable, __file__, "--child", str(size), variant, spec, malloc_call, str(steps),
               str(timed_steps), str(warmup_size)]
    result = subprocess.run(command, env={**clean, **environment}, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_seconds(measured: dict) -> float:
    """A child's step time: the median of its timed steps, which run after the measured ones (so after
    Conv3d's first backward has timed its weight-gradient forms and Adam has made its state)."""
    return median(measured["seconds_by_step"])


PEAK_HEADERS = ["spec", "malloc", "variant", "peak RSS GiB", "peak RSS after each step GiB",
                "RSS torch imported / warmed up GiB", "of which file-backed GiB (imported / warmed up / after the steps)",
                "malloc peak GiB", "planned peak GiB",
                "(RSS - warmed up) / planned", "(RSS - torch imported) / planned", "malloc peak / planned"]


def peak_row(spec_name: str, setting: str, variant: str, measured: dict) -> list:
    """One row of the peak-memory table (`PEAK_HEADERS`) from a child's JSON.

    The planner's peak counts the step's tensors, not the process (`MemoryPlan.not_counted`), so
    the first ratio compares it with the peak RSS above the warmed-up process; the second, above
    the process with torch merely imported, adds what the first step loads (see `warmed_up_rss`).
    The file-backed column is the part of each baseline, and of the RSS after the steps, that maps
    libraries' files: code that differs between machines, not the step's data ("-" where not read)."""
    gib, planned = 2**30, measured["planned_peak"]
    warmed = measured.get("warmed_rss")
    file_backed = measured.get("file_backed_rss", {})
    return [f"UNetSpec.{spec_name}()", setting, variant, measured["peak_rss"] / gib,
            " / ".join(f"{rss / gib:.2f}" for rss in measured["peak_rss_by_step"]),
            f"{measured['baseline_rss'] / gib:.2f} / " + ("-" if warmed is None else f"{warmed / gib:.2f}"),
            " / ".join("-" if file_backed.get(when) is None else f"{file_backed[when] / gib:.2f}"
                       for when in ("baseline", "warmed", "after_steps")),
            measured["malloc_peak_step"] / gib, planned / gib,
            "-" if warmed is None else (measured["peak_rss"] - warmed) / planned,
            (measured["peak_rss"] - measured["baseline_rss"]) / planned, measured["malloc_peak_step"] / planned]


def peak_part(args, tables, data):
    rows, peaks = [], {}
    peak_shape = (1, 1, 8, args.peak_size, args.peak_size)
    settings_run = args.peak_mallocs.split(",") if args.peak_mallocs else list(MALLOC_SETTINGS)
    for spec_name in args.peak_specs.split(","):
        for setting in settings_run:
            environment, call, only = MALLOC_SETTINGS[setting]
            for name in args.peak_switches.split(","):
                if only is not None and name not in only:
                    continue
                measured = run_child(args.peak_size, name, spec_name, environment=environment, malloc_call=call,
                                     steps=args.peak_steps, timed_steps=args.timed_steps,
                                     warmup_size=args.warmup_size)
                peaks[f"{spec_name}, {setting}, {name}"] = {**measured, "malloc": setting, "spec": spec_name,
                                                            "variant": name}
                rows.append(peak_row(spec_name, setting, name, measured))
                print(f"peak: {rows[-1]}", flush=True)
    text = table(PEAK_HEADERS, rows)
    print(f"\nPeak memory of {args.peak_steps} training steps with Adam at {peak_shape}, fresh process each "
          f"(warm-up at {args.warmup_size}x{args.warmup_size}):\n{text}")
    tables["peak_memory"] = text
    tables["malloc_tradeoff"] = tradeoff_table(peaks)
    print(f"\nWhat each malloc setting costs in time and saves in memory:\n{tables['malloc_tradeoff']}")
    data["peak_memory"] = {"shape": peak_shape, "steps": args.peak_steps, "warmup_size": args.warmup_size,
                           "peaks": peaks}


def tradeoff_table(peaks: dict) -> str:
    """Per spec and variant: each malloc setting's step time over the timing setting's, and its peak RSS
    over the fixed threshold's, from the same fresh-process runs (one process per setting, so the times
    are single runs of a few steps, not the alternating rounds of the other tables)."""
    rows = []
    for measured in peaks.values():
        same = {m["malloc"]: m for m in peaks.values()
                if (m["spec"], m["variant"]) == (measured["spec"], measured["variant"])}
        fastest, smallest = same.get(TIMING_SETTING), same.get(FIXED_THRESHOLD)
        rows.append([f"UNetSpec.{measured['spec']}()", measured["variant"], measured["malloc"],
                     step_seconds(measured),
                     "-" if fastest is None else step_seconds(measured) / step_seconds(fastest),
                     measured["peak_rss"] / 2**30,
                     "-" if smallest is None else measured["peak_rss"] / smallest["peak_rss"]])
    return table(["spec", "variant", "malloc", "step s (timed steps, median)",
                  "time / MALLOC_MMAP_MAX_=0", "peak RSS GiB", "peak RSS / fixed threshold"], rows)


if __name__ == "__main__":
    main()
