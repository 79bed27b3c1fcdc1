"""DynamicConvFusion3D's single grouped convolution vs the naive sum of K expert convolutions.

The original research code ran K full 3D convolutions and summed them with the router's weights.
CondConv's observation is that the weighted sum can be taken over the *kernels* first, leaving one
convolution per sample, which we run as one grouped convolution over the batch.

    python benchmarks/dynamic_conv.py            # (1,32,8,128,128) and (2,32,8,128,128), K=4, 3x3x3
    python benchmarks/dynamic_conv.py --quick    # smaller sizes, for a smoke run

Prints medians of interleaved runs (A B A B ...) and the ratio ours/naive, forward and forward+backward,
and checks that the outputs match.
"""

import argparse

import torch

from benchmarks._timing import alternate, header, median
from cpcbm_blocks import DynamicConvFusion3D
from cpcbm_blocks.blocks.fusion_dynamic_conv import naive_dynamic_conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [(1, 32, 4, 32, 32), (2, 32, 4, 32, 32)] if args.quick else [(1, 32, 8, 128, 128), (2, 32, 8, 128, 128)]
    print(header("DynamicConvFusion3D: one grouped convolution vs K convolutions summed (K=4, 3x3x3, fp32)"))
    print(f"| input | pass | naive K convs (s) | ours (s) | ours / naive | max abs diff |")
    print(f"|---|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    block = DynamicConvFusion3D(channels=32, num_experts=4, kernel_size=(3, 3, 3))
    for shape in sizes:
        x = torch.randn(shape)
        weights = torch.softmax(torch.randn(shape[0], 4), dim=-1)
        with torch.no_grad():
            diff = (block.dynamic_conv(x, weights)
                    - naive_dynamic_conv(x, block.experts, block.expert_bias, weights)).abs().max().item()

        def forward(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        def train(fn):
            def run():
                block.zero_grad(set_to_none=True)
                fn().square().mean().backward()
            return run

        ours = lambda: block.dynamic_conv(x, weights)  # noqa: E731
        naive = lambda: naive_dynamic_conv(x, block.experts, block.expert_bias, weights)  # noqa: E731
        for name, wrap in (("forward", forward), ("forward+backward", train)):
            seconds = alternate({"naive": wrap(naive), "ours": wrap(ours)}, repeats=args.repeats)
            a, b = median(seconds["naive"]), median(seconds["ours"])
            print(f"| {tuple(shape)} | {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
