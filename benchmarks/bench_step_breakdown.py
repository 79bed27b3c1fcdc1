"""Where a train step's time goes: convolutions, attention, norms, activations, the rest, ours vs MONAI.

The train-step benchmark gives one number per model. This one splits a step (forward + backward,
fp32, batch 1, the same models and settings as `bench_train_step.py`) by the kind of operator that
spent the time: each step runs under `torch.profiler` (CPU), and every operator's self time (the
time in it and not in an operator it called) goes to one class by its name. Time in autograd's
nodes and custom `Function`s themselves and time outside any operator (Python, the autograd engine)
are their own rows, so the rows add up to the profiled step.

It answers what the train-step table cannot: how far a faster everything-but-convolutions could take
the ratio to MONAI. The last table divides our convolutions' time alone by MONAI's whole step: no
change outside the convolutions can bring the ratio below that.

    python benchmarks/bench_step_breakdown.py --size 256 --repeats 3

Models alternate A B C A B C after a warm-up; each figure is the median over the repeats.
"""

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from bench_train_step import compared_steps
from common import median, save, setup, table

CLASSES = ("convolutions", "matrix products", "attention", "norms", "activations",
           "elementwise, copies, reductions", "autograd nodes and Functions", "outside any operator")


def operator_class(name: str) -> str:
    """The class of one profiler event, by its name (`aten::...` operators, else autograd's nodes)."""
    if not name.startswith("aten::"):
        return "autograd nodes and Functions"
    op = name.removeprefix("aten::")
    if "conv" in op:  # convolution(_backward), mkldnn_convolution, _convolution (transposed), slow_conv*
        return "convolutions"
    if "attention" in op or "softmax" in op:
        return "attention"
    if op in {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"}:
        return "matrix products"
    if op.startswith(("native_group_norm", "native_layer_norm", "native_batch_norm", "group_norm", "layer_norm")):
        return "norms"
    if any(act in op for act in ("silu", "gelu", "sigmoid", "tanh", "relu")):
        return "activations"
    return "elementwise, copies, reductions"


def profiled_step(step) -> dict[str, float]:
    """Seconds per class in one profiled call of `step`, and the step's wall time under the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
    seconds = dict.fromkeys(CLASSES, 0.0)
    for event in prof.key_averages():
        seconds[operator_class(event.key)] += event.self_cpu_time_total / 1e6
    seconds["outside any operator"] = max(0.0, wall - sum(seconds.values()))
    return seconds | {"step": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128, help="H=W of (1,1,8,H,W)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-monai", action="store_true")
    args = parser.parse_args()
    env = setup()
    shape = (1, 1, 8, args.size, args.size)
    steps = compared_steps(args.size, monai=not args.no_monai)
    for step in steps.values():  # warm-up: Conv3d times its weight-gradient forms on the first backward
        step()
        step()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            runs[name].append(profiled_step(step))
    med = {name: {key: median([run[key] for run in values]) for key in (*CLASSES, "step")}
           for name, values in runs.items()}

    headers = ["operators", *(f"{name} s" for name in steps), *(f"{name} share" for name in steps)]
    rows = [[cls, *(med[name][cls] for name in steps), *(f"{med[name][cls] / med[name]['step']:.0%}" for name in steps)]
            for cls in CLASSES]
    rows.append(["whole step (profiled)", *(med[name]["step"] for name in steps), *("100%" for _ in steps)])
    text = table(headers, rows)
    print(f"\nTrain step at {shape}, fp32, by operator class (median of {args.repeats}):\n{text}")
    tables = {"breakdown": text}

    if "MONAI" in steps:
        monai_step = med["MONAI"]["step"]
        floor_rows = []
        for name in (n for n in steps if n != "MONAI"):
            floor_rows.append([name, med[name]["step"] / monai_step, med[name]["convolutions"] / monai_step,
                               (med[name]["convolutions"] + med[name]["matrix products"]) / monai_step])
        floor = table(["ours", "step / MONAI step", "if all but convolutions took no time",
                       "... but convolutions and matrix products"], floor_rows)
        print(f"\nRatio to MONAI's step, and the least it could be if the other operators took no time:\n{floor}")
        tables["floor"] = floor
    save(f"step_breakdown_{args.size}", env, tables, {"size": args.size, "runs": runs, "medians": med})


if __name__ == "__main__":
    main()
