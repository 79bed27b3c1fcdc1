"""Channels-last on CPU: the same operators and the same train step in NCDHW and in NDHWC (`channels_last_3d`).

PyTorch's tuning guides suggest channels-last for convolutional networks, and oneDNN reads NDHWC
without the reorders it makes for NCDHW. This script measures, for the default UNet's two largest
levels at the full-size input, each operator a residual block runs: the 3x3x3 convolution's forward,
input gradient and weight gradient, GroupNorm's forward and backward, SiLU and the residual addition,
in both layouts (the convolution's weight in the same layout as its input). Then it times whole train
steps with the model and its input in each layout (`model.to(memory_format=torch.channels_last_3d)`):
the default (selective recomputation), `selective=False`, and every level and the middle checkpointed.

    python benchmarks/bench_layout.py --sizes 128 --repeats 3
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from bench_train_step import train_step
from common import alternate, median, save, setup, table

from cpcbm_blocks import UNet3D, UNetSpec

CHANNELS_LAST = torch.channels_last_3d
LAYOUTS = {"NCDHW": torch.contiguous_format, "NDHWC": CHANNELS_LAST}
VARIANTS = {"default": {}, "selective=False": {"selective": False},
            "checkpointed": {"levels": tuple(range(1, len(UNetSpec.default().levels) + 1)), "mid": True}}
"""The train steps compared, as `UNet3D.set_gradient_checkpointing` switches."""


def operators(channels: int, depth: int, side: int, memory_format: torch.memory_format) -> dict:
    """One residual block's operators at `(1, channels, depth, side, side)`, on tensors in `memory_format`."""
    torch.manual_seed(0)
    shape = (1, channels, depth, side, side)
    x, grad = (torch.randn(shape).contiguous(memory_format=memory_format) for _ in range(2))
    weight = torch.randn(channels, channels, 3, 3, 3).contiguous(memory_format=memory_format) * 0.05
    gamma, beta = torch.ones(channels), torch.zeros(channels)
    n, c, hxw, groups = 1, channels, depth * side * side, 32
    _, mean, rstd = torch.ops.aten.native_group_norm(x, gamma, beta, n, c, hxw, groups, 1e-5)

    def conv_grad(mask):
        return lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1],
                                                           False, [0, 0, 0], 1, mask)
    return {
        "conv 3x3x3 forward": lambda: F.conv3d(x, weight, padding=1),
        "conv 3x3x3 input gradient": conv_grad([True, False, False]),
        "conv 3x3x3 weight gradient": conv_grad([False, True, False]),
        "GroupNorm forward": lambda: F.group_norm(x, groups, gamma, beta),
        "GroupNorm backward": lambda: torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, gamma, n, c, hxw, groups, [True, True, True]),
        "SiLU": lambda: F.silu(x),
        "addition": lambda: x + grad,
    }


def train_steps(size: int) -> tuple[dict, dict]:
    """The default UNet's train step with model and input in each layout (same weights, same data), by
    (layout, variant), and the model of each layout."""
    shape = (1, 1, 8, size, size)
    torch.manual_seed(0)
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])
    reference = UNet3D(UNetSpec.default())
    steps, models = {}, {}
    for layout, memory_format in LAYOUTS.items():
        model = copy.deepcopy(reference).to(memory_format=memory_format)
        models[layout] = model
        x_in, target_in = x.contiguous(memory_format=memory_format), target.contiguous(memory_format=memory_format)
        for variant, switches in VARIANTS.items():
            steps[(layout, variant)] = train_step(model, x_in, t, target_in, **switches)
    return steps, models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="128", help="H=W of (1,1,8,H,W) for the train steps, comma-separated")
    parser.add_argument("--op-size", type=int, default=256, help="H=W of the input whose levels 1 and 2 the operators run at")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = setup()
    levels = [(32, 8, args.op_size), (64, 4, args.op_size // 2)]
    op_rows, op_data = [], []
    for channels, depth, side in levels:
        candidates = {}
        for layout, memory_format in LAYOUTS.items():
            for name, run in operators(channels, depth, side, memory_format).items():
                candidates[(name, layout)] = run
        times = alternate(candidates, repeats=max(5, args.repeats), warmup=1)
        for name in dict.fromkeys(name for name, _ in candidates):
            first, last = median(times[(name, "NCDHW")]), median(times[(name, "NDHWC")])
            op_rows.append([f"1,{channels},{depth},{side},{side}", name, first * 1e3, last * 1e3, last / first])
            op_data.append({"shape": [1, channels, depth, side, side], "operator": name,
                            "ncdhw_seconds": times[(name, "NCDHW")], "ndhwc_seconds": times[(name, "NDHWC")]})
    op_table = table(["tensor", "operator", "NCDHW ms", "NDHWC ms", "NDHWC / NCDHW"], op_rows)
    print(op_table)
    step_rows, step_data = [], []
    for size in (int(v) for v in args.sizes.split(",")):
        steps, _ = train_steps(size)
        times = alternate(steps, repeats=args.repeats, warmup=1)
        for variant in VARIANTS:
            first, last = median(times[("NCDHW", variant)]), median(times[("NDHWC", variant)])
            step_rows.append([f"1,1,8,{size},{size}", variant, first, last, last / first])
            step_data.append({"size": size, "variant": variant, "ncdhw_seconds": times[("NCDHW", variant)],
                              "ndhwc_seconds": times[("NDHWC", variant)]})
    step_table = table(["input", "UNet3D", "NCDHW s", "NDHWC s", "NDHWC / NCDHW"], step_rows)
    print(step_table)
    save("layout", env, {"operators": op_table, "train_step": step_table}, {"operators": op_data, "steps": step_data})


if __name__ == "__main__":
    main()
