"""Shared by the benchmark scripts: the environment header, tables and JSON results (timing: `_timing.py`).

Every script times its variants in ONE process, alternating them (A B A B ...) after a warm-up, and
reports medians and ratios. The header says which torch, how many threads and which glibc malloc
settings were in force, because those move the figures more than most code changes.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from _timing import alternate as alternate  # A B A B after a warm-up; shared with dynamic_conv.py
from _timing import median as median

RESULTS = Path(__file__).resolve().parent / "results"
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_",
                    "MALLOC_MMAP_THRESHOLD_")
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def setup(threads: int = 2) -> dict:
    """Fix the thread count, print and return the environment the figures were measured in."""
    torch.set_num_threads(threads)
    malloc = {k: os.environ[k] for k in MALLOC_VARIABLES if k in os.environ}
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "machine": platform.machine(), "malloc": malloc or "glibc default",
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import monai
        env["monai"] = monai.__version__
    except ImportError:
        pass
    print(f"torch {env['torch']}, python {env['python']}, torch threads {env['threads']} of {env['cpu_count']} CPUs, "
          f"malloc {env['malloc']}" + (f", monai {env['monai']}" if "monai" in env else ""))
    return env


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (it reads as a plain table in a terminal too)."""
    text = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in text]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def save(name: str, env: dict, tables: dict[str, str], data: dict) -> Path:
    """Write `results/<name>.json`: what `render_performance.py` turns into docs/performance.md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"name": name, "env": env, "tables": tables, "data": data}, indent=2))
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def training_and_inference(forms: dict, grad: torch.Tensor, leaves: list[torch.Tensor]) -> dict:
    """For each form (a function returning a tensor): `"<name>, fwd+bwd"` (the gradients of `leaves`
    cleared, then `backward(grad)`) and `"<name>, fwd"` (under `no_grad`), ready for `alternate`."""
    def training(form):
        def run():
            for leaf in leaves:
                leaf.grad = None
            form().backward(grad)
        return run

    def inference(form):
        def run():
            with torch.no_grad():
                form()
        return run

    variants = {f"{name}, fwd+bwd": training(form) for name, form in forms.items()}
    return variants | {f"{name}, fwd": inference(form) for name, form in forms.items()}
