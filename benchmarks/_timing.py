"""Shared helpers for the benchmark scripts: alternating A/B timing in one process, and a header."""

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def header(title: str) -> str:
    """What every benchmark prints first: what ran, on which versions, threads and allocator settings."""
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return (f"# {title}\n"
            f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} thread(s), "
            f"{os.cpu_count()} CPU(s), glibc malloc settings: {malloc or 'default'}\n")


def alternate(candidates: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
              warmup_seconds: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time each candidate `repeats` times, interleaved A B A B ..., after `warmup` untimed rounds.

    Interleaving spreads slow drifts of the machine (other load, thermal) evenly over the candidates,
    so their ratio holds up even where absolute times are noisy. The warm-up rounds are left out of
    the result; pass `warmup_seconds` (a dict) to have their times too: a first call pays one-time
    costs (compilation, kernel selection) that users meet once per process.
    """
    for _ in range(warmup):
        for name, run in candidates.items():
            seconds = _seconds(run)
            if warmup_seconds is not None:
                warmup_seconds.setdefault(name, []).append(seconds)
    timed: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            timed[name].append(_seconds(run))
    return timed


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)
