"""Train step (forward + backward, fp32, batch 1): our default UNet vs MONAI's DiffusionModelUNet.

MONAI is configured as close as it allows to our default: 3-D, channels (32, 64, 128, 256), 2 res
blocks per level, attention at the last level only, 8 channels per head, 32 groups, SDPA attention
(`use_flash_attention=True`). It cannot keep depth at 1 past the third level (it halves every axis)
and uses 3x3x3 kernels everywhere, so it does more FLOPs; both counts are printed (FlopCounterMode
over a real step). Ours runs with its default selective recomputation and, as a second variant, without
it (`selective=False`: more memory, no recomputation). Optionally also under `torch.compile` (inductor).
Besides the ratio of medians (`time / ours`), each row gives its time over MONAI's round by round
(median and range): machine noise moves single steps by several percent, and a ratio target is met
only where the rounds agree. The first step (the untimed warm-up, timed apart) pays what a process
pays once: compilation under `torch.compile` (from an empty inductor cache), and `Conv3d` timing both
weight-gradient forms.

This CPU's fp32 FMA peak (`fma_peak.py`) alternates with the steps, so each row also gives its
FLOP/s as a share of the peak measured in the same run, and a second table turns the 0.5x-MONAI
target into the share of the peak our step would need to run at to meet it (left out, with the
reason printed, where no C compiler is found).

    python benchmarks/bench_train_step.py --sizes 64,128 --repeats 3 [--compile]

`pip install monai` (after torch) to include MONAI. Variants alternate A B A B after a warm-up.
"""

import argparse
import os
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import alternate, median, save, setup, table
from fma_peak import FmaPeak

from cpcbm_blocks import UNet3D, UNetSpec
from cpcbm_blocks.memory import CPU_ATTENTION_FLOP_FORMULAS


def monai_unet():
    from monai.networks.nets import DiffusionModelUNet
    return DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64, 128, 256),
                              attention_levels=(False, False, False, True), num_res_blocks=2, num_head_channels=8,
                              norm_num_groups=32, use_flash_attention=True)


def train_step(model, x, t, target, **switches):
    """One step; `switches` for `set_gradient_checkpointing` (set before each step: variants share the model)."""
    def run():
        if isinstance(model, UNet3D):
            model.set_gradient_checkpointing(**switches)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t), target).backward()
    return run


def compared_steps(size: int, *, monai: bool, compiled: bool = False) -> dict:
    """The train steps compared at `(1, 1, 8, size, size)`, on the same seeded data: our default UNet, the
    same with `selective=False`, MONAI's nearest configuration (`monai`) and ours under `torch.compile`
    (`compiled`)."""
    shape = (1, 1, 8, size, size)
    torch.manual_seed(0)
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])
    ours = UNet3D(UNetSpec.default())
    steps = {"cpcbm_blocks": train_step(ours, x, t, target),
             "cpcbm_blocks, selective=False": train_step(ours, x, t, target, selective=False)}
    if monai:
        steps["MONAI"] = train_step(monai_unet(), x, t, target)
    if compiled:
        # dynamic=False: torch 2.13's inductor fails to lower these convolutions with symbolic sizes
        # (pytorch#188422), which its automatic dynamic shapes would use from the second size on.
        steps["cpcbm_blocks compiled"] = train_step(torch.compile(ours, dynamic=False), x, t, target)
    return steps


def rounds_over(values: list[float], reference: list[float] | None) -> list[float]:
    """Each round's time over the reference's in the same round (A B A B: round i of both ran back to
    back), or nothing without a reference. Their spread says how far one run's ratio of medians can
    be trusted: a target such as "at most 0.5x MONAI" is met only where the rounds agree."""
    return [] if reference is None else [ours / theirs for ours, theirs in zip(values, reference, strict=True)]


def spread(ratios: list[float]) -> str:
    """`median (min-max)` of per-round ratios, or "-" where there are none."""
    return f"{median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-"


def count_flops(step) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOP_FORMULAS) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64,128", help="H=W of (1,1,8,H,W), comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time our UNet under torch.compile (inductor)")
    parser.add_argument("--no-monai", action="store_true")
    args = parser.parse_args()
    if args.compile:
        # A cold cache, as in a user's first run: inductor would otherwise reuse the graphs and kernels an
        # earlier run left in its cache, and the first step would not show the compilation.
        cache = tempfile.TemporaryDirectory(prefix="cpcbm-inductor-")  # removed when main() returns
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    env = setup()
    peak = FmaPeak.build(threads=torch.get_num_threads(), seconds=0.4)
    rows, data, needs, peaks = [], [], [], {}
    for size in (int(v) for v in args.sizes.split(",")):
        variants = compared_steps(size, monai=not args.no_monai, compiled=args.compile)
        first: dict[str, list[float]] = {}  # the warm-up round: compilation, Conv3d's first-backward timing
        times = alternate(variants | ({} if peak is None else {"FMA peak": peak}), repeats=args.repeats,
                          warmup=1, warmup_seconds=first)
        peak_rate = None if peak is None else peak.flops / median(times.pop("FMA peak"))
        peaks[size] = peak_rate
        # Counted after the runs: Conv3d's first backward of a problem also times both weight-gradient forms.
        flops = {name: count_flops(step) for name, step in variants.items() if "compiled" not in name}
        base = median(times["cpcbm_blocks"])
        for name, values in times.items():
            nominal = flops.get(name, flops["cpcbm_blocks"])
            by_round = rounds_over(values, times.get("MONAI") if name != "MONAI" else None)
            rate = nominal / median(values)
            rows.append([f"1,1,8,{size},{size}", name, median(values), min(values), max(values),
                         median(values) / base, spread(by_round), first[name][0], nominal / 1e9, rate / 1e9]
                        + ([] if peak_rate is None else [rate / peak_rate]))
            data.append({"size": size, "variant": name, "seconds": values, "first_step_s": first[name][0],
                         "median_s": median(values),
                         "ratio_to_ours": median(values) / base, "ratio_to_monai_by_round": by_round,
                         "gflop": nominal / 1e9, "share_of_fma_peak": None if peak_rate is None else rate / peak_rate})
        if peak_rate is not None and "MONAI" in times:
            needs.append(half_of_monai(size, flops["cpcbm_blocks"], times, peak_rate))
        print(f"\n{size}x{size}: " + ", ".join(f"{k} {median(v):.3f} s" for k, v in times.items()), flush=True)
    headers = ["input", "model", "median s", "min s", "max s", "time / ours", "time / MONAI by round",
               "first step s", "GFLOP (fwd+bwd)", "GFLOP/s"] + ([] if peak is None else ["GFLOP/s / FMA peak"])
    text = table(headers, rows)
    print(f"\nTrain step, fp32, batch 1, {args.repeats} alternating rounds after 1 warm-up each:\n{text}")
    name = "train_step_compile" if args.compile else "train_step"  # the MONAI table and the compile one apart
    tables = {name: text}
    if needs:
        tables[f"{name}_needs"] = table(
            ["input", "MONAI median s", "0.5x MONAI s", "our step's GFLOP", "GFLOP/s it needs", "FMA peak GFLOP/s",
             "needed / FMA peak", "ours achieved / FMA peak"], needs)
        print(f"\nWhat 0.5x MONAI asks of our step, against this CPU's fp32 FMA peak:\n{tables[name + '_needs']}")
    save(name, env, tables, {"rows": data, "repeats": args.repeats,
                             "fma_peak_gflops": {size: None if r is None else r / 1e9 for size, r in peaks.items()},
                             "fma_peak": None if peak is None else {"label": peak.label, "iterations": peak.iterations}})


def half_of_monai(size: int, our_flops: int, times: dict[str, list[float]], peak_rate: float) -> list:
    """The 0.5x-MONAI target as a rate: our step's FLOPs in half of MONAI's median time, and that rate as
    a share of the FMA peak beside the share our step achieved. A share above what a lone convolution
    reaches (the roofline benchmark) is out of reach without fewer FLOPs."""
    half = median(times["MONAI"]) / 2
    achieved = our_flops / median(times["cpcbm_blocks"])
    return [f"1,1,8,{size},{size}", 2 * half, half, our_flops / 1e9, our_flops / half / 1e9, peak_rate / 1e9,
            our_flops / half / peak_rate, achieved / peak_rate]


if __name__ == "__main__":
    main()
