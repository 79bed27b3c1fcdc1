"""One attention block at the 32x32 level of the full-size default: fused SDPA vs the naive einsum path.

`MultiHeadSelfAttention3D(channels=256, head_channels=8)` on `(1, 256, 1, 32, 32)`: 1024 tokens, 32
heads of 8 channels. Forward + backward, alternating after a warm-up.

    python benchmarks/bench_attention.py --repeats 7
"""

import argparse

import torch

from common import alternate, median, save, setup, table

from cpcbm_blocks import MultiHeadSelfAttention3D, attention_backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = setup()
    torch.manual_seed(0)
    block = MultiHeadSelfAttention3D(channels=256, head_channels=8, num_groups=32)
    torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    x = torch.randn(1, 256, 1, 32, 32, requires_grad=True)

    def run(backend):
        def step():
            with attention_backend(backend):
                block(x).sum().backward()
        return step

    times = alternate({"sdpa": run("sdpa"), "naive": run("naive")}, repeats=args.repeats)
    rows = [[name, median(v), min(v), max(v), median(v) / median(times["sdpa"])] for name, v in times.items()]
    text = table(["attention backend", "median s", "min s", "max s", "time / sdpa"], rows)
    print(f"\nAttention block (1,256,1,32,32), 32 heads x 8 channels, forward + backward:\n{text}")
    save("attention", env, {"attention": text}, {"times": times})


if __name__ == "__main__":
    main()
