"""Measure what a real CPU run allocates, to hold the planner ([`memory_plan`][cpcbm_blocks.memory.memory_plan]) to it.

The resident set size (RSS) of a process is what the operating system sees, and it is more than the
tensors: glibc's malloc keeps freed memory for reuse (how much depends on `MALLOC_*` settings), and
the process itself (Python, torch's libraries) holds a few hundred MiB before any model exists. What
malloc has *handed out* (`mallinfo2`: heap bytes in use plus mmapped chunks) is the tensors, the
kernels' scratch buffers and the interpreter's own small objects, and nothing the allocator merely
keeps. The benchmarks report both; the tests use the second.

```python
from cpcbm_blocks.measure import PeakMallocSampler, held_for_backward

with PeakMallocSampler() as sampler:
    train_step()
print(sampler.peak_bytes - sampler.start_bytes)   # the most the step had allocated at once
```
"""

import ctypes
import gc
import os
import threading
import time
from typing import Self

import torch
from torch.utils._pytree import tree_leaves

from cpcbm_blocks.malloc import glibc

__all__ = ["PeakMallocSampler", "file_backed_rss_bytes", "held_for_backward", "huge_page_bytes", "malloc_bytes_in_use",
           "peak_rss_bytes", "rss_bytes", "transparent_huge_page_mode"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


_MALLINFO2 = _mallinfo2()


def malloc_bytes_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not taken back (heap in use + mmapped chunks).

    None where that cannot be read (not glibc, or glibc older than 2.33, which added `mallinfo2`).
    """
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def rss_bytes() -> int | None:
    """This process's resident set size now (`/proc/self/statm`); None off Linux."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def peak_rss_bytes() -> int | None:
    """This process's own high-water resident set size (`VmHWM` in `/proc/self/status`); None off Linux.

    Not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that across `execve`, where it takes
    the high-water RSS of the address space being left. For a process started by `subprocess` (which
    uses `vfork`) that is the *parent's*, so a child of a parent that once held 3 GiB reports at least
    3 GiB, however little it uses. `VmHWM` belongs to the address space the program runs in.
    """
    return _proc_kib("/proc/self/status", "VmHWM:")


def file_backed_rss_bytes() -> int | None:
    """The part of this process's resident set that maps files (`RssFile` in `/proc/self/status`): the
    pages of the shared libraries' code and data it has touched (libtorch's kernels, Python's modules),
    not its tensors. None off Linux.

    These pages are clean: the kernel can drop them under memory pressure (and read them back when
    the code runs again), and processes that load the same library share them. The anonymous rest
    (`rss_bytes()` minus this) is what the process allocated itself: tensors, malloc's heap, Python's
    objects. Reading both tells a process that holds more code pages from one that holds more data."""
    return _proc_kib("/proc/self/status", "RssFile:")


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory now in transparent huge pages (`AnonHugePages` in
    `/proc/self/smaps_rollup`); None off Linux, or on a kernel without that file (before 4.14).

    The check that `THP_MEM_ALLOC_ENABLE=1` took effect: with it, torch's tensors of 2 MiB or more
    are marked for huge pages, and where the kernel's mode (`/sys/kernel/mm/transparent_hugepage/enabled`)
    is `madvise` or `always` some of them are backed by 2 MiB pages while they live; without it, in
    `madvise` mode, this stays near 0. Read it while large tensors are alive (such as the parameters)."""
    return _proc_kib("/proc/self/smaps_rollup", "AnonHugePages:")


def _proc_kib(path: str, field: str) -> int | None:
    """The bytes of a `field: <n> kB` line of a `/proc` file; None where the file or the line is missing."""
    try:
        with open(path) as lines:
            line = next((line for line in lines if line.startswith(field)), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024


THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_page_mode(path: str = THP_MODE_PATH) -> str:
    """The kernel's transparent-huge-page mode: the bracketed word of `path`, such as `"madvise"` in
    `always [madvise] never`; `"unknown (...)"` where it cannot be read. In `madvise` mode only memory
    marked for huge pages gets them (torch's large tensors under `THP_MEM_ALLOC_ENABLE=1`), in
    `always` mode any large enough mapping, in `never` none."""
    try:
        with open(path) as mode:
            text = mode.read()
    except OSError:
        return f"unknown (no {path})"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


class PeakMallocSampler:
    """The largest `malloc_bytes_in_use()` seen while the block runs, polled by a thread.

    PyTorch's kernels release the GIL, so the thread samples inside long operators too; a
    transient buffer that lives for less than `interval_s` can be missed.
    """

    def __init__(self, *, interval_s: float = 0.001) -> None:
        if _MALLINFO2 is None:
            raise RuntimeError("PeakMallocSampler needs glibc >= 2.33 (mallinfo2).")
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, malloc_bytes_in_use())
            time.sleep(self.interval_s)

    def __enter__(self) -> Self:
        gc.collect()
        self.start_bytes = self.peak_bytes = malloc_bytes_in_use()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, malloc_bytes_in_use())


def held_for_backward(model: torch.nn.Module, *args, **kwargs) -> int:
    """Bytes the autograd graph of a forward with grad holds: what the activations saved for backward take.

    Measured as what freeing the forward's output gives back to malloc, less the output's own bytes
    (what [`MemoryPlan.saved_bytes`][cpcbm_blocks.memory.MemoryPlan.saved_bytes] predicts). Both
    readings come after the forward, so nothing the forward does to caches outside the graph (a
    kernel cache that fills on a first call, or evicts an old entry and frees it) moves the result.
    """
    if _MALLINFO2 is None:
        raise RuntimeError("held_for_backward needs glibc >= 2.33 (mallinfo2).")
    with torch.enable_grad():
        out = model(*args, **kwargs)
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tree_leaves(out)
                if isinstance(t, torch.Tensor)}  # each once: outputs may be views of one storage
    output_bytes = sum(storages.values())
    gc.collect()
    alive = malloc_bytes_in_use()
    del out
    gc.collect()
    return alive - malloc_bytes_in_use() - output_bytes
