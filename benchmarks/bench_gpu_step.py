"""Full-size training steps on a GPU: time, `torch.cuda.max_memory_allocated` and the planner's prediction.

One training step with Adam (forward, MSE loss, backward, optimizer step) at `(1, 1, 8, 256, 256)`,
batch 1, for these variants:

- the default UNet in three precisions: **bf16 autocast** (fp32 weights, bf16 compute: what a user
  trains with), **bf16** (weights and activations cast, what `cpcbm-blocks plan --dtype bf16` plans)
  and **fp32** (what `cpcbm-blocks plan` plans);
- the default UNet with selective recomputation (`set_gradient_checkpointing(selective=True)`;
  off by default on a GPU: these rows show why), and with its input and weights in
  `torch.channels_last_3d` (the layout cuDNN's tensor-core convolutions read, so it need not
  transpose each operand), in bf16 autocast and fp32;
- the default UNet checkpointed (every level and the middle), in bf16 autocast and in fp32;
- the conditioned UNet (text and three image conditions) in bf16 autocast, with and without
  selective recomputation, in fp32, and in fp32 checkpointed (every level, the middle and the
  condition encoder);
- MONAI's nearest configuration (`bench_train_step.monai_unet`), in bf16 autocast and fp32, where
  MONAI is installed: the `/ MONAI` column divides each of our default UNet's times by MONAI's in
  the same precision.

Times alternate A B A B after a warm-up (with `torch.cuda.synchronize()` inside each step). The
memory of each variant is measured alone, after a first step has made Adam's state: the most
allocated during one step minus what was allocated before its model existed, next to the planner's
peak for the same dtype and switches (the planner does not model autocast's bf16 copies of the
weights, so the fp32 plan stands beside the autocast rows as a reference, not a prediction; it plans
contiguous tensors, so the channels-last rows have none).

    python benchmarks/bench_gpu_step.py --repeats 10              # on a machine with a CUDA device
    python benchmarks/bench_gpu_step.py --compile --repeats 10    # eager vs torch.compile, bf16 autocast
    python benchmarks/bench_gpu_step.py --profile                 # the CUDA kernels of one step
    python benchmarks/bench_gpu_step.py --snapshot "default, fp32"  # what is allocated at the peak
    python benchmarks/bench_gpu_step.py --device cpu --size 64 --repeats 1   # a smoke run of the script
    python benchmarks/bench_gpu_step.py --replan                  # plan the saved rows again (no GPU)

`--compile` times the default UNet in bf16 autocast eager against the same under `torch.compile`
(the first, compiling step timed apart) and saves `results/gpu_step_compile.json`. `--profile`
prints the operators that took the most GPU time in one bf16-autocast step, those that took the
most CPU time, and the step's summed kernel time over its wall time (well under 1 means the GPU
waits on Python and kernel launches). `--snapshot VARIANT` records the CUDA caching allocator's
history over one steady-state step (`torch.cuda.memory._record_memory_history`), replays it to the
moment the most was allocated, and prints what was live then, by the line of this library (or of
torch) that allocated it, beside the planner's peak; `--snapshot-file` also writes the snapshot
(a pickle, as `torch.cuda.memory._dump_snapshot` writes it; pytorch.org/memory_viz reads it).
`--replan` plans every row of `results/gpu_step.json` again with this checkout's planner and
rewrites its table: the measurements are the GPU's, the plan needs no GPU, so a planner change is
checked against the last GPU run without one.
"""

import argparse
import gc
import json
import pickle
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench_train_step import monai_unet
from common import RESULTS, alternate, median, save, setup, table

from cpcbm_blocks import UNet3D, UNetSpec, shape_checks
from cpcbm_blocks.memory import _conditions, memory_plan

TEXT_TOKENS = 77
EVERY_LEVEL = {"levels": (1, 2, 3, 4), "mid": True}


@dataclass(frozen=True)
class Variant:
    """One row: which network, in which precision, with which memory switches."""

    network: str  # "default", "conditioned" or "MONAI"
    precision: str  # "bf16 autocast", "bf16" or "fp32"
    checkpointing: dict = field(default_factory=dict)  # keyword arguments of set_gradient_checkpointing
    channels_last: bool = False  # input, weights and so every activation in torch.channels_last_3d

    @property
    def switches(self) -> dict:
        """The keyword arguments of `set_gradient_checkpointing` (selective recomputation as the library
        decides it for a GPU step, off, unless given)."""
        return {"selective": None, **self.checkpointing}

    def to_dict(self) -> dict:
        """What a result row records of its variant, with selective recomputation as it applied on a GPU."""
        switches = self.switches
        if switches["selective"] is None:
            switches["selective"] = False  # `selective_by_default` on a GPU
        return {"network": self.network, "precision": self.precision, "switches": switches,
                "channels_last": self.channels_last}

    @classmethod
    def from_dict(cls, row: dict) -> "Variant":
        """The variant a result row recorded (`to_dict`)."""
        return cls(row["network"], row["precision"], dict(row["switches"]), channels_last=row["channels_last"])

    def planned_bytes(self, shape: tuple[int, ...]) -> int | None:
        """The planner's peak for the same network, dtype and switches (the fp32 plan for autocast)."""
        if self.network == "MONAI" or self.channels_last:
            return None
        switches = self.switches
        dtype = "bf16" if self.precision == "bf16" else "fp32"
        return memory_plan(_spec(self.network), shape, dtype=dtype, device="cuda", text_tokens=TEXT_TOKENS,
                           checkpoint_levels=switches.get("levels", ()), checkpoint_mid=switches.get("mid", False),
                           checkpoint_conditions=switches.get("conditions", False),
                           selective=switches["selective"]).peak_bytes


SELECTIVE = {"selective": True}
VARIANTS = {
    "default, bf16 autocast": Variant("default", "bf16 autocast"),
    "default, bf16 autocast, selective=True": Variant("default", "bf16 autocast", SELECTIVE),
    "default, bf16 autocast, channels_last_3d": Variant("default", "bf16 autocast", channels_last=True),
    "default, bf16": Variant("default", "bf16"),
    "default, fp32": Variant("default", "fp32"),
    "default, fp32, selective=True": Variant("default", "fp32", SELECTIVE),
    "default, fp32, channels_last_3d": Variant("default", "fp32", channels_last=True),
    "default, bf16 autocast, checkpointed": Variant("default", "bf16 autocast", EVERY_LEVEL),
    "default, fp32, checkpointed": Variant("default", "fp32", EVERY_LEVEL),
    "conditioned, bf16 autocast": Variant("conditioned", "bf16 autocast"),
    "conditioned, bf16 autocast, selective=True": Variant("conditioned", "bf16 autocast", SELECTIVE),
    "conditioned, fp32": Variant("conditioned", "fp32"),
    "conditioned, fp32, checkpointed": Variant("conditioned", "fp32", {**EVERY_LEVEL, "conditions": True}),
    "MONAI, bf16 autocast": Variant("MONAI", "bf16 autocast"),
    "MONAI, fp32": Variant("MONAI", "fp32"),
}


def _spec(network: str) -> UNetSpec:
    return UNetSpec.conditioned() if network == "conditioned" else UNetSpec.default()


def make_step(variant: Variant, shape: tuple[int, ...], device: torch.device, *,
              compiled: bool = False) -> Callable[[], None]:
    """A model, its optimizer and data on `device`, and a function that runs one synchronised step."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if variant.precision == "bf16" else torch.float32
    if variant.network == "MONAI":
        model, conditions = monai_unet(), {}
    else:
        spec = _spec(variant.network)
        model = UNet3D(spec).set_gradient_checkpointing(**variant.switches)
        conditions = {k: torch.randn(v.shape, device=device, dtype=dtype)
                      for k, v in _conditions(spec, shape, dtype, TEXT_TOKENS).items()}
    layout = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), foreach=True)
    x, target = (torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout) for _ in range(2))
    t = torch.tensor([500.0], device=device)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.precision == "bf16 autocast"):
            prediction = forward(x, t, **conditions)
        torch.nn.functional.mse_loss(prediction.float(), target.float()).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def measured_peak_bytes(variant: Variant, shape: tuple[int, ...], device: torch.device) -> int | None:
    """Peak bytes one steady-state step allocates on the GPU beyond what existed before its model."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    step = make_step(variant, shape, device)
    step()  # Adam's state exists from here on, as in the plan's steady state
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() - before
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def available(variants: dict[str, Variant]) -> dict[str, Variant]:
    """The variants this machine can run: MONAI's only where it is installed."""
    try:
        import monai  # noqa: F401
    except ImportError:
        print("MONAI is not installed: its rows are left out (`pip install monai` after torch).")
        return {name: v for name, v in variants.items() if v.network != "MONAI"}
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=256, help="H=W of (1,1,8,H,W)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile instead of the variants")
    parser.add_argument("--profile", action="store_true", help="the CUDA kernels of one step instead")
    parser.add_argument("--snapshot", metavar="VARIANT", choices=list(VARIANTS),
                        help="what is allocated at the peak of one step of VARIANT instead")
    parser.add_argument("--snapshot-file", help="with --snapshot: also write the allocator's snapshot here")
    parser.add_argument("--replan", nargs="?", const=RESULTS / "gpu_step.json", type=Path, metavar="RESULT",
                        help="plan the rows of a saved result (default: results/gpu_step.json) again with this "
                             "planner (no GPU needed)")
    args = parser.parse_args()
    if args.replan:
        return replan(args.replan)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step.py: --device cuda but torch.cuda.is_available() is False. Run it on a "
                         "machine with a CUDA device, or pass --device cpu --size 64 for a smoke run.")
    env = setup()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        print(f"GPU: {env['gpu']}")
    shape = (1, 1, 8, args.size, args.size)
    with shape_checks(False):
        if args.profile:
            return profile(shape, device)
        if args.snapshot:
            return peak_allocations(VARIANTS[args.snapshot], shape, device, args.snapshot_file)
        if args.compile:
            return compare_compiled(shape, device, args.repeats, env)
        variants = available(VARIANTS)
        times = alternate({name: make_step(v, shape, device) for name, v in variants.items()},
                          repeats=args.repeats, warmup=2)
        gc.collect()
        peaks = {name: measured_peak_bytes(v, shape, device) for name, v in variants.items()}
    rows = [{"variant": name, **variant.to_dict(), "seconds": times[name], "peak_bytes": peaks[name],
             "planned_bytes": variant.planned_bytes(shape)} for name, variant in variants.items()]
    text = step_table(rows)
    print(f"\nTraining step with Adam, {shape}, {args.device}:\n{text}")
    if device.type != "cuda":
        print("(a smoke run on the CPU: not saved)")
        return
    save("gpu_step", env, {"gpu_step": text}, {"rows": rows, "shape": shape, "repeats": args.repeats})


def step_table(rows: list[dict]) -> str:
    """The table of `main`'s result rows; `/ MONAI` divides a default-UNet row's median by MONAI's in
    the same precision (not for checkpointed rows, which trade time for memory)."""
    monai = {row["precision"]: median(row["seconds"]) for row in rows if row["network"] == "MONAI"}
    cells = []
    for row in rows:
        values, peak, plan = row["seconds"], row["peak_bytes"], row["planned_bytes"]
        reference = monai.get(row["precision"]) if row["network"] == "default" else None
        cells.append([row["variant"], median(values), min(values), max(values),
                      f"{median(values) / reference:.3f}" if reference and "levels" not in row["switches"] else "-",
                      "n/a" if peak is None else peak / 2**30, "n/a" if plan is None else plan / 2**30,
                      "n/a" if peak is None or plan is None else peak / plan])
    return table(["step", "median s", "min s", "max s", "/ MONAI", "max_memory_allocated GiB", "planned GiB",
                  "measured / planned"], cells)


def replan(path: Path) -> None:
    """Plan every row of the result at `path` (as `main` saves it) again with this process's planner and
    rewrite its table: the GPU's measurements stay as they were, the planned column follows the planner
    (which needs no GPU), and `data.replanned_utc` says when."""
    result = json.loads(path.read_text())
    shape = tuple(result["data"]["shape"])
    for row in result["data"]["rows"]:
        row["planned_bytes"] = Variant.from_dict(row).planned_bytes(shape)
    result["data"]["replanned_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    result["tables"]["gpu_step"] = step_table(result["data"]["rows"])
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(result["tables"]["gpu_step"])


def compare_compiled(shape: tuple[int, ...], device: torch.device, repeats: int, env: dict) -> None:
    """The default UNet in bf16 autocast, eager vs `torch.compile` (inductor, static shapes)."""
    variant = VARIANTS["default, bf16 autocast"]
    steps = {"eager": make_step(variant, shape, device), "torch.compile": make_step(variant, shape, device, compiled=True)}
    first: dict[str, list[float]] = {}
    times = alternate(steps, repeats=repeats, warmup=2, warmup_seconds=first)
    data = {"seconds": times, "first_seconds": first, "shape": shape, "repeats": repeats}
    text = compile_table(data)
    print(f"\nTraining step with Adam, default UNet, {shape}, {device}:\n{text}")
    if device.type == "cuda":
        save("gpu_step_compile", env, {"gpu_step_compile": text}, data)


def compile_table(data: dict) -> str:
    """The table of `compare_compiled`'s result: each step's first (compiling) time, then its timed ones."""
    times, first = data["seconds"], data["first_seconds"]
    eager = median(next(v for name, v in times.items() if name.startswith("eager")))
    rows = [[name, first[name][0], median(v), min(v), max(v), median(v) / eager] for name, v in times.items()]
    return table(["bf16 autocast step", "first step s", "median s", "min s", "max s", "time / eager"], rows)


def profile(shape: tuple[int, ...], device: torch.device) -> None:
    """The kernels that took the most device time in one bf16-autocast step of the default UNet."""
    from torch.profiler import ProfilerActivity
    step = make_step(VARIANTS["default, bf16 autocast"], shape, device)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        started = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if started is not None:
            ended = torch.cuda.Event(enable_timing=True)
            started.record()
        step()
        if started is not None:
            ended.record()
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=30, max_name_column_width=70))
    if device.type == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    if started is not None:
        kernels_ms = sum(getattr(e, key) for e in events) / 1e3
        wall_ms = started.elapsed_time(ended)
        print(f"summed kernel time {kernels_ms:.1f} ms over a step's {wall_ms:.1f} ms on the GPU's clock: "
              f"{kernels_ms / wall_ms:.2f} busy")



def peak_allocations(variant: Variant, shape: tuple[int, ...], device: torch.device, path: str | None) -> None:
    """What was allocated when one steady-state step of `variant` allocated the most, by allocating line."""
    if device.type != "cuda":
        raise SystemExit("bench_gpu_step.py --snapshot: the CUDA caching allocator's history needs --device cuda.")
    step = make_step(variant, shape, device)
    step()  # Adam's state exists from here on
    gc.collect()
    torch.cuda.synchronize()
    before = {b["address"]: {"size": b["size"], "frames": [], "before": True}
              for b in _live_blocks(torch.cuda.memory._snapshot())}
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="all")
    torch.cuda.reset_peak_memory_stats()
    step()
    measured = torch.cuda.max_memory_allocated()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if path:
        with open(path, "wb") as file:
            pickle.dump(snapshot, file)
    peak, at_peak = replay_to_peak(before, snapshot["device_traces"][0])
    by_line: dict[str, list[int]] = {}
    for block in at_peak.values():
        line = "(held before the step: weights, Adam state, data)" if block.get("before") else \
            _allocating_line(block.get("frames", []))
        by_line.setdefault(line, []).append(block["size"])
    rows = sorted(([line, len(sizes), sum(sizes) / 2**20] for line, sizes in by_line.items()), key=lambda r: -r[2])
    planned = variant.planned_bytes(shape)
    print(f"\n{variant}, {shape}: replayed peak {peak / 2**30:.3f} GiB (max_memory_allocated "
          f"{measured / 2**30:.3f} GiB, the same blocks counted by the allocator itself); planned peak "
          f"{'n/a' if planned is None else f'{planned / 2**30:.3f} GiB'}. What was live at the replayed peak:")
    print(table(["allocated by", "blocks", "MiB"], rows[:40]))


def replay_to_peak(before: dict[int, dict], trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replay the allocator's `trace` from the blocks live `before` it (address -> block with a `size`):
    the most bytes allocated at once, and the blocks live at that moment (address -> block or event).
    A block counts from its `alloc` to its `free_requested` (what `max_memory_allocated` counts)."""
    live = dict(before)
    allocated = peak = sum(block["size"] for block in live.values())
    at_peak = dict(live)
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            allocated += event["size"]
            if allocated > peak:
                peak, at_peak = allocated, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            allocated -= live.pop(event["addr"])["size"]
    return peak, at_peak


def _live_blocks(snapshot: dict) -> list[dict]:
    return [block for segment in snapshot["segments"] for block in segment["blocks"]
            if block["state"] == "active_allocated"]


def _allocating_line(frames: list[dict]) -> str:
    """Who asked for a block: the innermost frame of this library (else of any Python file), and the
    innermost C++ frame above the allocator (the operator, for a block a C++ autograd node made)."""
    python = [f for f in frames if f["filename"].endswith(".py")]
    ours = [f for f in python if "cpcbm_blocks" in f["filename"]] or python
    where = ""
    if ours:
        name = ours[0]["filename"].split("site-packages/")[-1].split("cpcbm_blocks/")[-1]
        where = f"{name}:{ours[0]['line']} {ours[0]['name']}"
    native = [f["name"] for f in frames if not f["filename"].endswith(".py")
              and not any(skip in f["name"] for skip in _ALLOCATOR_FRAMES)]
    operator = native[0][:70] if native else ""
    return " | ".join(part for part in (where, operator) if part) or "(no stack recorded)"


_ALLOCATOR_FRAMES = ("c10::", "CachingAllocator", "unwind", "gather", "Allocator", "allocate", "malloc",
                     "at::empty", "at::detail::empty", "at::native::empty", "TensorBase", "_PyEval", "Py")

if __name__ == "__main__":
    main()
