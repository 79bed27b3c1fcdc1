"""One convolution's forward, input gradient and weight gradient: oneDNN's 3-D kernels vs depth taps (and,
for 1x1x1 kernels, matrix products).

The measurement behind `Conv3d`'s CPU training path (`cpcbm_blocks.blocks.conv`): for the
full-resolution levels of the default UNet, the variants alternate in one process after a warm-up;
FLOP/s use the 3-D formula (`2 * out * c_in * taps`) for all of them, so they compare directly.
3x3x3 kernels compare the 3-D weight gradient with depth taps; 1x1x1 kernels (the residual blocks'
skip projections, the FiLM maps of dynamic-convolution fusion) also compare oneDNN's forward and
input gradient with the matrix products `Conv3d` once used, and add the matrix-product weight
gradient that `set_weight_grad_method("auto")` times as a third candidate.

    python benchmarks/bench_conv_backward.py --repeats 5
"""

import argparse

import torch
import torch.nn.functional as F

from common import alternate, median, save, setup, table

from cpcbm_blocks.blocks.conv_weight_grad import _matmul_weight_grad, weight_grad_by_depth_taps

SHAPES = [  # (c_in, c_out, d, h, w, taps): level 1 at 128 and 256 (down 32->32, up 64->32), level 2 at 256
    (32, 32, 8, 128, 128, 3), (64, 32, 8, 128, 128, 3), (32, 32, 8, 256, 256, 3), (64, 32, 8, 256, 256, 3),
    (64, 64, 4, 128, 128, 3),
    # 1x1x1: an up block's skip projection and a FiLM map at level 1 (256), an up block's skip projection at level 2
    (64, 32, 8, 256, 256, 1), (32, 64, 8, 256, 256, 1), (128, 64, 4, 128, 128, 1),
]
_backward = torch.ops.aten.convolution_backward


def variants(x, weight, grad_out):
    padding = weight.shape[2] // 2
    args = (None, (1, 1, 1), (padding,) * 3, (1, 1, 1), False, (0, 0, 0), 1)
    found = {
        "forward (F.conv3d)": lambda: F.conv3d(x, weight, None, 1, padding),
        "input gradient (aten)": lambda: _backward(grad_out, x, weight, *args, [True, False, False]),
        "weight gradient, 3-D (aten)": lambda: _backward(grad_out, x, weight, *args, [False, True, False]),
        "weight gradient, depth taps": lambda: weight_grad_by_depth_taps(grad_out, x, weight, stride=(1, 1, 1),
                                                                         padding=(padding,) * 3),
    }
    if weight.shape[2] == 1:
        matrix = weight.flatten(1)
        found["forward, matrix product"] = lambda: torch.matmul(matrix, x.flatten(2))
        found["input gradient, matrix product"] = lambda: torch.matmul(matrix.T, grad_out.flatten(2))
        found["weight gradient, matrix product"] = lambda: _matmul_weight_grad(grad_out, x, weight)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = setup()
    rows, data = [], []
    for c_in, c_out, d, h, w, taps in SHAPES:
        torch.manual_seed(0)
        x, weight = torch.randn(1, c_in, d, h, w), torch.randn(c_out, c_in, taps, taps, taps) * 0.05
        grad_out = torch.randn(1, c_out, d, h, w)
        flops = 2 * grad_out.numel() * c_in * taps**3
        times = alternate(variants(x, weight, grad_out), repeats=args.repeats)
        reference = median(times["weight gradient, 3-D (aten)"])
        for name, values in times.items():
            rows.append([f"{taps}x{taps}x{taps}, {c_in}->{c_out}, {d}x{h}x{w}", name, median(values), flops / median(values) / 1e9,
                         reference / median(values)])
            data.append({"shape": [c_in, c_out, d, h, w], "taps": taps, "variant": name, "seconds": values})
        print(f"{taps}^3 {c_in}->{c_out} {d}x{h}x{w}: " + ", ".join(f"{k} {median(v):.3f} s" for k, v in times.items()), flush=True)
    text = table(["convolution", "variant", "median s", "GFLOP/s", "3-D weight gradient / this"], rows)
    print(f"\nOne convolution, fp32, batch 1, {args.repeats} alternating rounds:\n{text}")
    save("conv_backward", env, {"conv_backward": text}, {"rows": data, "repeats": args.repeats})


if __name__ == "__main__":
    main()
