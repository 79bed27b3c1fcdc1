"""Returning freed blocks to the OS, with and without transparent huge pages for PyTorch's tensors.

A fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`, `cpcbm_blocks.malloc.return_freed_blocks()`)
keeps a CPU step's peak RSS near what `cpcbm-blocks plan` predicts, because every freed tensor goes
back to the OS. The price is time: each large tensor is then a fresh mapping whose pages fault in
(and are zeroed) 4 KiB at a time, on every step. PyTorch's `THP_MEM_ALLOC_ENABLE=1` aligns every
allocation of 2 MiB or more to 2 MiB and marks it `madvise(MADV_HUGEPAGE)`, so where the kernel's
transparent huge pages are in `madvise` or `always` mode those pages fault in 2 MiB at a time.
torch reads the variable once, when it first allocates a tensor that large, so set it in the
environment before Python starts.

Each variant runs in a FRESH process (`bench_memory.py`'s child: two training steps for the peak, so
that it includes Adam's state, then the timed steps), under each setting in turn, the settings
alternating over `--rounds` rounds. The peak RSS is the process's own `VmHWM`; the time is the
median of the timed steps, pooled over the rounds. The timing setting (every freed block kept)
stands beside them as the fastest reference. The last column, the anonymous memory in huge pages
after a step (`cpcbm_blocks.measure.huge_page_bytes`), shows whether the variable took effect.

    python benchmarks/bench_malloc_thp.py --size 256 --rounds 2
"""

import argparse

from bench_memory import run_child
from common import TUNED_MALLOC, median, save, setup, table

from cpcbm_blocks.measure import transparent_huge_page_mode

SETTINGS = {  # name -> environment of the child (no other malloc variable reaches it)
    "fixed threshold": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    "fixed threshold + THP_MEM_ALLOC_ENABLE=1": {"MALLOC_MMAP_THRESHOLD_": "65536", "THP_MEM_ALLOC_ENABLE": "1"},
    "MALLOC_MMAP_MAX_=0 (the timing setting)": dict(TUNED_MALLOC),
}
VARIANTS = ("selective recomputation (default)", "checkpointing (every level + mid + conditions)")


def huge_pages_mib(readings: list[int | None]) -> str:
    """The range over the rounds of what a child held in huge pages after its last peak step (its
    parameters, gradients and Adam's moments are alive then): the check that `THP_MEM_ALLOC_ENABLE=1`
    took effect. "-" where it could not be read."""
    known = [r / 2**20 for r in readings if r is not None]
    if not known:
        return "-"
    return f"{min(known):.0f}" if min(known) == max(known) else f"{min(known):.0f}-{max(known):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--spec", default="default", choices=("default", "conditioned"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=2)
    args = parser.parse_args()
    env = setup() | {"transparent_hugepage": transparent_huge_page_mode()}
    print(f"transparent huge pages: {env['transparent_hugepage']}", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_number in range(args.rounds):
        for variant in VARIANTS:
            for setting, environment in SETTINGS.items():
                # two steps for the peak, so that it includes Adam's state
                measured = run_child(args.size, variant, args.spec, environment=environment, steps=2,
                                     timed_steps=args.timed_steps)
                runs.setdefault((variant, setting), []).append(measured)
                print(f"round {round_number + 1}: {variant}, {setting}: steps {measured['seconds_by_step']}, "
                      f"peak RSS {measured['peak_rss'] / 2**30:.2f} GiB", flush=True)
    rows = []
    for variant in VARIANTS:
        reference = median([s for m in runs[(variant, "fixed threshold")] for s in m["seconds_by_step"]])
        for setting in SETTINGS:
            measured = runs[(variant, setting)]
            seconds = [s for m in measured for s in m["seconds_by_step"]]
            rows.append([variant, setting, median(seconds), min(seconds), max(seconds), median(seconds) / reference,
                         max(m["peak_rss"] for m in measured) / 2**30,
                         huge_pages_mib([m["huge_pages_by_step"][-1] for m in measured])])
    text = table(["variant", "malloc", "step s (median)", "min s", "max s", "time / fixed threshold",
                  "peak RSS GiB", "in huge pages after a step MiB"], rows)
    print(f"\nUNetSpec.{args.spec}() at (1, 1, 8, {args.size}, {args.size}), fresh process per run, "
          f"{args.rounds} rounds; transparent huge pages: {env['transparent_hugepage']}:\n{text}")
    save("malloc_thp", env, {"malloc_thp": text}, {"runs": {f"{v}, {s}": m for (v, s), m in runs.items()}})


if __name__ == "__main__":
    main()
