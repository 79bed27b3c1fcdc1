"""A full-size training step on a GPU: time, `torch.cuda.max_memory_allocated` and the planner's prediction.

The default UNet at `(1, 1, 8, 256, 256)`, batch 1, one training step with Adam (forward, MSE loss,
backward, optimizer step), in three precisions:

- **bf16 autocast** (fp32 weights, bf16 compute): what a user trains with;
- **bf16** (weights and activations cast to bf16): what `cpcbm-blocks plan --dtype bf16` plans;
- **fp32**: what `cpcbm-blocks plan` plans.

Times alternate A B A B after a warm-up (with `torch.cuda.synchronize()` inside each step). The
memory of each variant is measured alone, after a first step has made Adam's state: the most
allocated during one step minus what was allocated before its model existed, next to the planner's
peak for the same dtype (the planner does not model autocast's cast copies of the weights).

    python benchmarks/bench_gpu_step.py --repeats 10            # on a machine with a CUDA device
    python benchmarks/bench_gpu_step.py --device cpu --size 64 --repeats 1   # a smoke run of the script itself

`--compile` adds the bf16-autocast step under `torch.compile`.
"""

import argparse
import gc

import torch

from common import alternate, median, save, setup, table

from cpcbm_blocks import UNet3D, UNetSpec, shape_checks
from cpcbm_blocks.memory import memory_plan


def make_step(spec, shape, device, precision, *, compiled=False):
    """A model, its optimizer and data on `device`, and a function that runs one synchronised step."""
    torch.manual_seed(0)
    model = UNet3D(spec).to(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), foreach=True)
    x, target = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            loss = torch.nn.functional.mse_loss(forward(x, t).float(), target.float())
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def measured_peak_bytes(spec, shape, device, precision) -> int | None:
    """Peak bytes one steady-state step allocates on the GPU beyond what existed before its model."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    step = make_step(spec, shape, device, precision)
    step()  # Adam's state exists from here on, as in the plan's steady state
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() - before
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=256, help="H=W of (1,1,8,H,W)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step.py: --device cuda but torch.cuda.is_available() is False. Run it on a "
                         "machine with a CUDA device, or pass --device cpu --size 64 for a smoke run.")
    env = setup()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        print(f"GPU: {env['gpu']}")
    spec, shape = UNetSpec.default(), (1, 1, 8, args.size, args.size)
    precisions = ["bf16 autocast", "bf16", "fp32"]
    with shape_checks(False):
        variants = {p: make_step(spec, shape, device, p) for p in precisions}
        if args.compile:
            variants["bf16 autocast, compiled"] = make_step(spec, shape, device, "bf16 autocast", compiled=True)
        times = alternate(variants, repeats=args.repeats, warmup=2)
        del variants
        peaks = {p: measured_peak_bytes(spec, shape, device, p) for p in precisions}
    planned = {"bf16": memory_plan(spec, shape, dtype="bf16", device="cuda").peak_bytes,
               "fp32": memory_plan(spec, shape, dtype="fp32", device="cuda").peak_bytes}
    planned["bf16 autocast"] = planned["fp32"]  # no autocast in the plan: the fp32 plan is the reference
    rows, data = [], []
    for name, values in times.items():
        peak = peaks.get(name)
        plan = planned.get(name)
        rows.append([name, median(values), min(values), max(values),
                     "n/a" if peak is None else peak / 2**30, plan / 2**30 if plan else "n/a",
                     "n/a" if peak is None or not plan else peak / plan])
        data.append({"variant": name, "seconds": values, "peak_bytes": peak, "planned_bytes": plan})
    text = table(["step", "median s", "min s", "max s", "max_memory_allocated GiB", "planned GiB",
                  "measured / planned"], rows)
    print(f"\nTraining step with Adam, default UNet, {shape}, {args.device}:\n{text}")
    if device.type != "cuda":
        print("(a smoke run on the CPU: not saved)")
        return
    save("gpu_step", env, {"gpu_step": text}, {"rows": data, "shape": shape, "repeats": args.repeats})


if __name__ == "__main__":
    main()
