"""The upsampler into level 1 of the full-size default: sub-pixel form (two ways to interleave) vs upsample-then-convolve.

`Upsample3D(channels=32, stride=(2, 2, 2))` takes `(1, 32, 4, 128, 128)` to `(1, 32, 8, 256, 256)`.
Three forms of the same function, forward + backward (gradients of the input, weight and bias),
alternating after a warm-up:

- **sub-pixel, strided interleave** (what `upsample_conv3d` runs in eager mode): one convolution at
  the low resolution with the 8 parity kernels, then one strided copy into the upsampled volume;
- **sub-pixel, interleave by slices** (what traced and compiled code runs): the same convolution,
  then the 8 parities sliced out and stacked; in backward autograd zero-fills a gradient of the
  whole convolution output per slice and adds the 8 up;
- **upsample, then convolve** (the seed's form): `F.interpolate` then a 3x3x3 `F.conv3d` at the high
  resolution.

    python benchmarks/bench_upsample.py --repeats 7
"""

import argparse
import math

import torch
import torch.nn.functional as F

from common import alternate, median, save, setup, table

from cpcbm_blocks.blocks.conv import conv3d
from cpcbm_blocks.blocks.upsample_conv import _parity_kernels, interleave_parities_by_slices, upsample_conv3d

SCALE, SHIFTS = (2, 2, 2), (True, True, True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = setup()
    torch.manual_seed(0)
    x = torch.randn(1, 32, 4, 128, 128, requires_grad=True)
    weight = (torch.randn(32, 32, 3, 3, 3) * 0.05).requires_grad_()
    bias = torch.zeros(32, requires_grad=True)
    grad = torch.randn(1, 32, 8, 256, 256)

    def by_slices():
        z = conv3d(x, _parity_kernels(weight, scale=SCALE), bias.repeat(math.prod(SCALE)))
        return interleave_parities_by_slices(z, 32, tuple(x.shape[2:]), SCALE, SHIFTS)

    variants = {
        "sub-pixel, strided interleave": lambda: upsample_conv3d(x, weight, bias, scale=SCALE),
        "sub-pixel, interleave by slices": by_slices,
        "upsample, then convolve": lambda: F.conv3d(F.interpolate(x, scale_factor=SCALE, mode="nearest"), weight,
                                                    bias, padding=1),
    }
    reference = variants["upsample, then convolve"]()
    for name, form in variants.items():  # the same function, or the comparison means nothing
        torch.testing.assert_close(form(), reference, rtol=1e-4, atol=1e-4, msg=name)

    def step(form):
        def run():
            x.grad = weight.grad = bias.grad = None
            form().backward(grad)
        return run

    times = alternate({name: step(form) for name, form in variants.items()}, repeats=args.repeats)
    base = median(times["sub-pixel, strided interleave"])
    rows = [[name, median(v), min(v), max(v), median(v) / base] for name, v in times.items()]
    text = table(["form", "median s", "min s", "max s", "time / strided"], rows)
    print(f"\nUpsample3D (1,32,4,128,128) -> (1,32,8,256,256), forward + backward:\n{text}")
    save("upsample", env, {"upsample": text}, {"times": times, "repeats": args.repeats})


if __name__ == "__main__":
    main()
