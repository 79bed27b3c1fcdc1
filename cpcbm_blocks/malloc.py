"""glibc's malloc settings from Python: trade speed for memory on CPU without environment variables.

A CPU training step allocates and frees activations of 1-128 MiB many times over. What glibc's
malloc does with a freed block decides both the step's time and its peak resident memory, and its
default is poor at both:

* **Default.** Blocks above the mmap threshold get their own `mmap` and go back to the OS when
  freed, and every later one page-faults in again (zeroed). Each such free *raises* the threshold
  to the freed size, up to 32 MiB, so from then on blocks up to 32 MiB come from the heap and stay
  resident after they are freed. The heap's high-water mark and the mmapped activations peak at
  different moments of a step, so the peak RSS adds both; and as the heap fragments it can keep
  growing over the first steps of a training run.
* [`keep_freed_blocks()`][cpcbm_blocks.malloc.keep_freed_blocks]: every block from the heap, and
  the heap kept (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`). Freed blocks stay
  resident and are reused, so a step page-faults far less: the setting the benchmarks run their
  timings under (whole steps were markedly faster and steadier with it on this project's 2-core
  machines), for a higher peak RSS.
* [`return_freed_blocks()`][cpcbm_blocks.malloc.return_freed_blocks]: a fixed mmap threshold
  (`MALLOC_MMAP_THRESHOLD_=65536`): every block of 64 KiB or more is its own mapping, returned
  when freed, so the peak RSS follows the tensors (what `cpcbm-blocks plan` predicts) plus the
  process; steps are slower than under the default, which keeps some blocks resident. PyTorch's
  `THP_MEM_ALLOC_ENABLE=1`, set in the environment before Python starts, has those fresh mappings
  fault in as 2 MiB transparent huge pages where the kernel allows them, which buys back part of the
  time (`cpcbm_blocks.measure.huge_page_bytes()` shows whether it took effect).

The performance page's memory benchmark prices each setting in step time and peak RSS for each
training mode (freed blocks kept, the fastest, also keeps most of what selective recomputation and
checkpointing save resident), and `benchmarks/bench_malloc_thp.py` the huge pages.

The environment variables do the same at start-up; these functions do it at any point of a running
process, e.g. in a notebook whose kernel has started, and take effect for the allocations that
follow. They change the whole process's allocator, so call them from your program, not from a
library. Only glibc (Linux) has these settings; elsewhere they raise `RuntimeError` and you need
nothing from them (macOS and musl allocators behave differently). `torch.cuda` memory is not malloc's.

```python
from cpcbm_blocks.malloc import return_freed_blocks

return_freed_blocks()              # before training a checkpointed model on CPU within a memory limit
```
"""

import ctypes
import ctypes.util
import functools
import platform

from cpcbm_blocks.errors import InputError

__all__ = ["MMAP_THRESHOLD_MAX_BYTES", "glibc", "keep_freed_blocks", "return_freed_blocks"]

# mallopt's parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4

MMAP_THRESHOLD_MAX_BYTES = 32 * 2**20
"""The largest mmap threshold glibc accepts on 64-bit systems (`HEAP_MAX_SIZE / 2`)."""

_LARGEST_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: 2 GiB, where the variable took 64
_DEFAULT_TRIM_THRESHOLD_BYTES, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") else None


def _mallopt(*settings: tuple[int, int]) -> None:
    libc = glibc()
    if libc is None:
        raise RuntimeError(f"cpcbm_blocks.malloc: these settings are glibc's; this process runs on "
                           f"{platform.system()} with {platform.libc_ver()[0] or 'another C library'}. "
                           "Its allocator does not take them; leave it as it is.")
    for parameter, value in settings:
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"cpcbm_blocks.malloc: glibc refused mallopt({parameter}, {value}).")


def keep_freed_blocks() -> None:
    """Serve every block from the heap and trim it only above 2 GiB free: the fastest steps, the highest peak RSS.

    The run-time form of `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`, under which the
    benchmarks time, except that `mallopt` takes the trim threshold as an `int`: the heap's free top
    goes back to the OS once it exceeds 2 GiB (the variable's 64 GiB meant never). Blocks mmapped
    before the call stay mapped until they are freed.
    """
    _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD_BYTES))


def return_freed_blocks(threshold_bytes: int = 65536) -> None:
    """Give every block of at least `threshold_bytes` its own mapping, returned to the OS when freed.

    The run-time form of `MALLOC_MMAP_THRESHOLD_=<threshold_bytes>`; a fixed threshold also stops
    glibc from raising it as blocks are freed, which is what keeps freed activations resident under
    its default. With it the peak RSS of a step is about the planned peak plus the process (a few
    hundred MiB), at the price of page faults on every large allocation. It also undoes
    `keep_freed_blocks()` (glibc's default trim threshold and mapping count come back).
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or not (
            0 < threshold_bytes <= MMAP_THRESHOLD_MAX_BYTES):
        raise InputError(f"return_freed_blocks: threshold_bytes: expected an int in 1..{MMAP_THRESHOLD_MAX_BYTES} "
                         f"(glibc's largest mmap threshold), got {threshold_bytes!r}. Pass a byte count such as "
                         "65536 (64 KiB).")
    _mallopt((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD_BYTES),
             (_M_MMAP_THRESHOLD, threshold_bytes))
