"""Achieved FLOP/s of our whole train step vs this machine's roofline, measured in the same run.

Five variants alternate: our default UNet's train step (forward + backward, fp32, batch 1), a single
`Conv3d` 32->32 3x3x3 forward + backward on the full-resolution level's tensor `(1, 32, 8, H, W)`
(torch's, and ours with the faster measured weight gradient), an fp32 4096^3 matmul, and this CPU's
fp32 FMA peak (`fma_peak.py`: vector FMAs in registers on every thread, the ceiling for all of them;
left out, with the reason printed, where no C compiler is found). FLOPs are nominal
(`FlopCounterMode`: convolutions, matmuls, attention); the peak's are counted from its loop.

    python benchmarks/bench_roofline.py --size 128 --repeats 3
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import alternate, median, save, setup, table
from fma_peak import FmaPeak

from cpcbm_blocks import Conv3d, UNet3D, UNetSpec
from cpcbm_blocks.memory import CPU_ATTENTION_FLOP_FORMULAS


def flops_of(run) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOP_FORMULAS) as counter:
        run()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-seconds", type=float, default=0.4, help="length of one FMA-peak run")
    args = parser.parse_args()
    env = setup()
    shape = (1, 1, 8, args.size, args.size)
    torch.manual_seed(0)
    model = UNet3D(UNetSpec.default())
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    ours = Conv3d(32, 32, kernel_size=(3, 3, 3))
    feature = torch.randn(1, 32, 8, args.size, args.size, requires_grad=True)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)

    def unet_step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t), target).backward()

    def conv_step():
        conv.zero_grad(set_to_none=True)
        conv(feature).sum().backward()

    def our_conv_step():  # the weight gradient by the faster of depth taps and oneDNN's 3-D kernel
        ours.zero_grad(set_to_none=True)
        ours(feature).sum().backward()

    def matmul():
        torch.mm(a, b)

    variants = {"UNet train step": unet_step, "torch Conv3d 32->32 fwd+bwd": conv_step,
                "cpcbm_blocks Conv3d 32->32 fwd+bwd": our_conv_step, "matmul 4096^3": matmul}
    peak = FmaPeak.build(threads=torch.get_num_threads(), seconds=args.peak_seconds)
    if peak is not None:
        variants[peak.label] = peak
    times = alternate(variants, repeats=args.repeats, warmup=1)
    # Counted after the runs: Conv3d's first backward of a problem also times both weight-gradient forms.
    flops = {name: peak.flops if peak is not None and run is peak else flops_of(run)
             for name, run in variants.items()}
    rate = {name: flops[name] / median(times[name]) for name in variants}
    headers = ["variant", "median s", "GFLOP", "GFLOP/s", "UNet GFLOP/s / this"]
    rows = [[name, median(times[name]), flops[name] / 1e9, rate[name] / 1e9, rate["UNet train step"] / rate[name]]
            for name in variants]
    if peak is not None:
        headers.append("this / FMA peak")
        for row, name in zip(rows, variants):
            row.append(rate[name] / rate[peak.label])
    text = table(headers, rows)
    print(f"\nRoofline at (1,1,8,{args.size},{args.size}), fp32, {args.repeats} alternating rounds:\n{text}")
    save(f"roofline_{args.size}", env, {f"roofline_{args.size}": text},
         {"size": args.size, "times": times, "flops": flops, "rates": rate,
          "fma_peak": None if peak is None else {"label": peak.label, "lanes": peak.lanes,
                                                 "threads": peak.threads, "iterations": peak.iterations}})


if __name__ == "__main__":
    main()
