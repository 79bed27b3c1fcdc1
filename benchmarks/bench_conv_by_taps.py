"""A convolution to a few output channels: oneDNN's 3-D kernel vs one matrix product over taps.

The output head of the default UNet is a 3x3x3 convolution from 32 channels to 1. oneDNN pads output
channels to its channel block, so that costs as much as a convolution to 8 or 16 channels.
`conv3d_by_taps` computes the products of every (output channel, tap) pair as one matrix product and
sums shifted slices of it (`cpcbm_blocks/blocks/conv_by_taps.py`); `Conv3d` takes it while
`C_out * taps <= 2 * C_in`. For each output-channel count this times, forward + backward (gradients
of the input, weight and bias) and forward alone under `no_grad`, alternating after a warm-up:

- **oneDNN**: `F.conv3d`, what `Conv3d` ran before;
- **by taps**: `conv3d_by_taps`.

3 output channels (81 tap channels, past the threshold) shows where the gain runs out.

    python benchmarks/bench_conv_by_taps.py --sizes 128,256 --repeats 5
    python benchmarks/bench_conv_by_taps.py --sizes 64 --in-channels 128 --out-channels 4,8   # at the threshold
"""

import argparse

import torch
import torch.nn.functional as F

from common import alternate, median, save, setup, table, training_and_inference

from cpcbm_blocks.blocks.conv_by_taps import conv3d_by_taps


def time_forms(in_channels: int, out_channels: int, size: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of both forms on one problem, training (fwd+bwd) and inference (fwd), alternating."""
    torch.manual_seed(0)
    x = torch.randn(1, in_channels, 8, size, size, requires_grad=True)
    weight = torch.randn(out_channels, in_channels, 3, 3, 3, requires_grad=True)
    bias = torch.randn(out_channels, requires_grad=True)
    grad = torch.randn(1, out_channels, 8, size, size)
    forms = {"oneDNN": lambda: F.conv3d(x, weight, bias, padding=1),
             "by taps": lambda: conv3d_by_taps(x, weight, bias)}
    # The same function, or the comparison means nothing.
    torch.testing.assert_close(forms["by taps"](), forms["oneDNN"](), rtol=1e-4, atol=1e-4)

    return alternate(training_and_inference(forms, grad, [x, weight, bias]), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="128,256", help="H=W of (1,C_in,8,H,W), comma-separated")
    parser.add_argument("--in-channels", type=int, default=32)
    parser.add_argument("--out-channels", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = setup()
    rows, data = [], []
    for size in (int(v) for v in args.sizes.split(",")):
        for out_channels in (int(v) for v in args.out_channels.split(",")):
            times = time_forms(args.in_channels, out_channels, size, args.repeats)
            for name, values in times.items():
                base = median(times["oneDNN, " + name.split(", ")[1]])
                rows.append([f"1,{args.in_channels},8,{size},{size}", out_channels, name, median(values) * 1e3,
                             min(values) * 1e3, max(values) * 1e3, median(values) / base])
                data.append({"size": size, "in_channels": args.in_channels, "out_channels": out_channels,
                             "variant": name, "seconds": values})
            print(f"{size}x{size} -> {out_channels}: " + ", ".join(f"{k} {median(v) * 1e3:.1f} ms"
                                                                   for k, v in times.items()), flush=True)
    text = table(["input", "C_out", "form", "median ms", "min ms", "max ms", "time / oneDNN"], rows)
    print(f"\n3x3x3 convolution from {args.in_channels} channels, batch 1:\n{text}")
    name = "conv_by_taps" if args.in_channels == 32 else f"conv_by_taps_{args.in_channels}"  # the page shows 32
    save(name, env, {name: text}, {"rows": data, "repeats": args.repeats})


if __name__ == "__main__":
    main()
