"""This CPU's fp32 FMA peak, measured: the ceiling for every convolution and matrix product.

A matrix product is a poor stand-in for it: which kernels a BLAS picks depends on the CPU's vendor
(MKL's sgemm on an AMD CPU is one example), so its FLOP/s can sit well below what the cores issue.
`fma_peak.c` runs twelve independent chains of vector FMAs in registers and nothing else; this
module compiles it with the system C compiler (`$CC`, else `cc`) into a temporary shared library,
and `FmaPeak` calls it from one thread per torch thread at once (ctypes releases the GIL during the
call), so that it can alternate with the other variants of a benchmark like any other callable.

    peak = FmaPeak.build(threads=2, seconds=0.4)   # None, with the reason printed, where it cannot run
    peak()                                          # one timed run: peak.flops FLOPs
"""

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().with_suffix(".c")

# acc = acc * a + b stays finite and away from denormals for any number of iterations.
_A, _B = 0.999999, 1e-7


class FmaPeak:
    """Run the FMA chains on `threads` threads at once for `iterations` rounds each."""

    def __init__(self, library: ctypes.CDLL, *, threads: int, iterations: int):
        self.library, self.threads, self.iterations = library, threads, iterations
        self.lanes, chains = library.fma_lanes(), library.fma_chains()
        self.flops = 2 * self.lanes * chains * iterations * threads  # one multiply and one add per lane

    @classmethod
    def build(cls, *, threads: int, seconds: float) -> "FmaPeak | None":
        """Compile, then pick the iterations that make one run last about `seconds`; None if impossible."""
        library = compile_library()
        if library is None:
            return None
        if library.fma_lanes() == 0:
            print("fma_peak: this CPU has neither AVX-512 nor AVX2 with FMA; no peak row.")
            return None
        probe = cls(library, threads=threads, iterations=10_000_000)
        started = time.perf_counter()
        probe()
        per_iteration = (time.perf_counter() - started) / probe.iterations
        return cls(library, threads=threads, iterations=max(1, round(seconds / per_iteration)))

    def __call__(self) -> list[float]:
        """One run on all threads at once; returns each thread's checksum (see `fma_peak.c`)."""
        return run_threads(self.library, threads=self.threads, iterations=self.iterations, a=_A, b=_B)

    @property
    def label(self) -> str:
        return f"fp32 FMA peak ({'AVX-512' if self.lanes == 16 else 'AVX2'}, {self.threads} threads)"


def run_threads(library: ctypes.CDLL, *, threads: int, iterations: int, a: float, b: float) -> list[float]:
    sums = [0.0] * threads

    def work(index: int) -> None:
        sums[index] = library.fma_run(iterations, a, b)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sums


def compile_library() -> ctypes.CDLL | None:
    """`fma_peak.c` as a loaded shared library, or None (and why, printed) without a C compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        print(f"fma_peak: no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH); no peak row. "
              "Install gcc or set CC to measure it.")
        return None
    folder = Path(tempfile.mkdtemp(prefix="fma_peak_"))
    target = folder / "libfma_peak.so"
    try:
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(target)],
                       check=True, capture_output=True, text=True)
        library = ctypes.CDLL(str(target))  # the mapping outlives the file, so the folder can go
    except (subprocess.CalledProcessError, OSError) as error:
        print(f"fma_peak: could not build {SOURCE.name} with {compiler}: "
              f"{getattr(error, 'stderr', '') or error}; no peak row.")
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    library.fma_run.argtypes = [ctypes.c_long, ctypes.c_float, ctypes.c_float]
    library.fma_run.restype = ctypes.c_float
    return library
