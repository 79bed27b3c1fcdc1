"""One 3x3x3 convolution's forward, input gradient and weight gradient: oneDNN's 3-D weight gradient vs depth taps.

The measurement behind `Conv3d`'s CPU training path (`cpcbm_blocks.blocks.conv.weight_grad_by_depth_taps`):
for the full-resolution levels of the default UNet, the four variants alternate in one process after
a warm-up; FLOP/s use the 3-D formula (`2 * out * c_in * 27`) for all four, so they compare directly.

    python benchmarks/bench_conv_backward.py --repeats 5
"""

import argparse

import torch
import torch.nn.functional as F

from common import alternate, median, save, setup, table

from cpcbm_blocks.blocks.conv import weight_grad_by_depth_taps

SHAPES = [  # (c_in, c_out, d, h, w): level 1 at 128 and 256 (down 32->32, up 64->32), level 2 at 256
    (32, 32, 8, 128, 128), (64, 32, 8, 128, 128), (32, 32, 8, 256, 256), (64, 32, 8, 256, 256), (64, 64, 4, 128, 128),
]
_backward = torch.ops.aten.convolution_backward


def variants(x, weight, grad_out):
    args = (None, (1, 1, 1), (1, 1, 1), (1, 1, 1), False, (0, 0, 0), 1)
    return {
        "forward (F.conv3d)": lambda: F.conv3d(x, weight, None, 1, 1),
        "input gradient (aten)": lambda: _backward(grad_out, x, weight, *args, [True, False, False]),
        "weight gradient, 3-D (aten)": lambda: _backward(grad_out, x, weight, *args, [False, True, False]),
        "weight gradient, depth taps": lambda: weight_grad_by_depth_taps(grad_out, x, weight, stride=(1, 1, 1),
                                                                         padding=(1, 1, 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = setup()
    rows, data = [], []
    for c_in, c_out, d, h, w in SHAPES:
        torch.manual_seed(0)
        x, weight = torch.randn(1, c_in, d, h, w), torch.randn(c_out, c_in, 3, 3, 3) * 0.05
        grad_out = torch.randn(1, c_out, d, h, w)
        flops = 2 * grad_out.numel() * c_in * 27
        times = alternate(variants(x, weight, grad_out), repeats=args.repeats)
        reference = median(times["weight gradient, 3-D (aten)"])
        for name, values in times.items():
            rows.append([f"{c_in}->{c_out}, {d}x{h}x{w}", name, median(values), flops / median(values) / 1e9,
                         reference / median(values)])
            data.append({"shape": [c_in, c_out, d, h, w], "variant": name, "seconds": values})
        print(f"{c_in}->{c_out} {d}x{h}x{w}: " + ", ".join(f"{k} {median(v):.3f} s" for k, v in times.items()), flush=True)
    text = table(["convolution", "variant", "median s", "GFLOP/s", "3-D weight gradient / this"], rows)
    print(f"\nOne 3x3x3 convolution, fp32, batch 1, {args.repeats} alternating rounds:\n{text}")
    save("conv_backward", env, {"conv_backward": text}, {"rows": data, "repeats": args.repeats})


if __name__ == "__main__":
    main()
