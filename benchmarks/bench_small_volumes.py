"""Batch-1 volumes PyTorch leaves to `slow_conv3d`: its kernel vs depth moved last vs oneDNN called as it is.

PyTorch's CPU backend hands a float32 convolution to oneDNN only when `N*C*D*H > 20480` (or the batch,
the groups or the kernel is large): the stem at any size, level 1 of a 64x64 crop and level 2 of a
128x128 one run `slow_conv3d`. For a stride-1 convolution `Conv3d` calls `aten.mkldnn_convolution`
directly, in the input's layout, and computes the input gradient with the same operator and the kernel
flipped (`cpcbm_blocks/blocks/conv.py`). For each problem this times forward + backward (gradients of
the input, unless it is the stem's single-channel input, the weight and the bias) and the forward alone
under `no_grad`, alternating after a warm-up:

- **slow_conv3d**: `F.conv3d`, what PyTorch picks;
- **depth last**: `F.conv3d` of the volume, kernel, stride and padding with depth moved last, which
  PyTorch hands to oneDNN (what `Conv3d` ran before; it still does for strided convolutions);
- **oneDNN as is**: `Conv3d`.

    python benchmarks/bench_small_volumes.py --repeats 7
"""

import argparse

import torch
import torch.nn.functional as F
from einops import rearrange

from common import alternate, median, save, setup, table, training_and_inference

from cpcbm_blocks import Conv3d

PROBLEMS = {  # name: (input shape, output channels)
    "stem at 128x128": ((1, 1, 8, 128, 128), 32),
    "stem at 256x256": ((1, 1, 8, 256, 256), 32),
    "level 1 at 64x64": ((1, 32, 8, 64, 64), 32),
    "level 2 at 128x128": ((1, 64, 4, 64, 64), 64),
}


def depth_last(x, weight, bias):
    """The convolution with depth moved last (input, kernel and padding), back in x's layout."""
    y = F.conv3d(rearrange(x, "b c d h w -> b c h w d"), rearrange(weight, "o i d h w -> o i h w d"), bias, padding=1)
    return rearrange(y, "b c h w d -> b c d h w").contiguous()


def time_forms(shape: tuple[int, ...], out_channels: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of the three forms on one problem, training (fwd+bwd) and inference (fwd), alternating."""
    torch.manual_seed(0)
    conv = Conv3d(shape[1], out_channels, kernel_size=(3, 3, 3))
    x = torch.randn(shape, requires_grad=shape[1] > 1)  # the stem's input (the noisy volume) needs no gradient
    grad = torch.randn(shape[0], out_channels, *shape[2:])
    forms = {"slow_conv3d": lambda: F.conv3d(x, conv.weight, conv.bias, padding=1),
             "depth last": lambda: depth_last(x, conv.weight, conv.bias),
             "oneDNN as is": lambda: conv(x)}
    reference = forms["slow_conv3d"]()
    for name in ("depth last", "oneDNN as is"):  # the same function, or the comparison means nothing
        torch.testing.assert_close(forms[name](), reference, rtol=1e-4, atol=1e-4)

    return alternate(training_and_inference(forms, grad, [x, conv.weight, conv.bias]), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = setup()
    rows, data = [], []
    for problem, (shape, out_channels) in PROBLEMS.items():
        times = time_forms(shape, out_channels, args.repeats)
        for name, values in times.items():
            base = median(times["slow_conv3d, " + name.split(", ")[1]])
            rows.append([problem, ",".join(map(str, shape)), out_channels, name, median(values) * 1e3,
                         min(values) * 1e3, max(values) * 1e3, median(values) / base])
            data.append({"problem": problem, "shape": shape, "out_channels": out_channels, "variant": name,
                         "seconds": values})
        print(f"{problem}: " + ", ".join(f"{k} {median(v) * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    text = table(["problem", "input", "C_out", "form", "median ms", "min ms", "max ms", "time / slow_conv3d"], rows)
    print(f"\n3x3x3 convolution, stride 1, batch 1:\n{text}")
    save("small_volumes", env, {"small_volumes": text}, {"rows": data, "repeats": args.repeats})


if __name__ == "__main__":
    main()
