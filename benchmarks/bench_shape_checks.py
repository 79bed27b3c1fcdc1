"""Shape checks on vs switched off at run time vs compiled out at import, in one process.

The package is imported twice: once normally (checks on; `shape_checks(False)` switches them off at
run time) and once more, under another name, with `CPCBM_SHAPE_CHECKS=0` (no wrapper exists). The
three train steps (forward + backward, fp32, batch 1) alternate after a warm-up.

    python benchmarks/bench_shape_checks.py --size 64 --repeats 7
"""

import argparse
import importlib
import os
import sys

import torch

from common import alternate, median, save, setup, table


def import_without_checks():
    """A second copy of cpcbm_blocks, imported with CPCBM_SHAPE_CHECKS=0."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "cpcbm_blocks"}
    for name in saved:
        del sys.modules[name]
    os.environ["CPCBM_SHAPE_CHECKS"] = "0"
    try:
        unchecked = importlib.import_module("cpcbm_blocks")
        assert not unchecked.contracts.CHECKS_AT_IMPORT
    finally:
        del os.environ["CPCBM_SHAPE_CHECKS"]
        for name in [n for n in sys.modules if n.split(".")[0] == "cpcbm_blocks"]:
            del sys.modules[name]
        sys.modules.update(saved)
    return unchecked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = setup()
    import cpcbm_blocks as checked
    unchecked = import_without_checks()
    assert checked.contracts.CHECKS_AT_IMPORT and checked.UNet3D is not unchecked.UNet3D
    shape = (1, 1, 8, args.size, args.size)
    torch.manual_seed(0)
    x, target, t = torch.randn(shape), torch.randn(shape), torch.tensor([500])
    model = checked.UNet3D(checked.UNetSpec.default())
    bare = unchecked.UNet3D(unchecked.UNetSpec.default())
    bare.load_state_dict(model.state_dict())

    def step(net, checks=True):
        def run():
            net.zero_grad(set_to_none=True)
            with checked.shape_checks(checks):
                torch.nn.functional.mse_loss(net(x, t), target).backward()
        return run

    variants = {"checks on": step(model), "off at run time": step(model, checks=False),
                "compiled out at import": step(bare)}
    times = alternate(variants, repeats=args.repeats, warmup=1)
    base = median(times["compiled out at import"])
    rows = [[name, median(v), min(v), max(v), median(v) / base] for name, v in times.items()]
    text = table(["shape checks", "median s", "min s", "max s", "time / compiled out"], rows)
    print(f"\nShape checks, train step at (1,1,8,{args.size},{args.size}), {args.repeats} alternating rounds:\n{text}")
    save("shape_checks", env, {"shape_checks": text}, {"size": args.size, "times": times})


if __name__ == "__main__":
    main()
