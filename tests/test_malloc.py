"""`cpcbm_blocks.malloc`: each setting does to a freed block what it says, in a fresh process.

The settings change the whole process's allocator, so every check runs in a child process; each is
run both ways, so that a setting that did nothing would fail.
"""

import json
import mmap
import subprocess
import sys

import pytest

from cpcbm_blocks import InputError, malloc
from cpcbm_blocks.measure import file_backed_rss_bytes, huge_page_bytes, rss_bytes, transparent_huge_page_mode

pytestmark = pytest.mark.skipif(malloc.glibc() is None, reason="glibc's malloc settings need glibc (Linux)")

_CHILD = """
import json, sys, torch
from cpcbm_blocks import malloc
from cpcbm_blocks.measure import rss_bytes as rss

MiB = 2**20
setting = sys.argv[1]
# What a step does first: a block above the threshold is mmapped and freed, which under glibc's
# default raises the mmap threshold to its size, so later blocks up to that size come from the heap.
first = torch.ones(24 * MiB // 4)
del first
if setting == "return":
    malloc.return_freed_blocks()
elif setting == "keep":
    malloc.keep_freed_blocks()
before = rss()
block = torch.ones(int(sys.argv[2]) * MiB // 4)  # written, so resident
del block
print(json.dumps({"kept_mib": (rss() - before) / MiB}))
"""


def _run(setting: str, block_mib: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, setting, str(block_mib)], capture_output=True, text=True,
                          timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_return_freed_blocks_gives_a_freed_block_back_that_the_default_keeps():
    default, returned = _run("default", 16), _run("return", 16)
    assert default["kept_mib"] >= 15, default  # the 16 MiB block stayed in glibc's heap, resident
    assert returned["kept_mib"] <= 1, returned


def test_keep_freed_blocks_keeps_a_freed_block_that_the_default_gives_back():
    default, kept = _run("default", 64), _run("keep", 64)
    assert default["kept_mib"] <= 1, default  # above 32 MiB glibc always maps, and unmaps on free
    assert kept["kept_mib"] >= 63, kept


@pytest.mark.parametrize("threshold", [0, -1, 2**30, True, 1.5, "64k"])
def test_a_threshold_glibc_would_refuse_is_refused_with_the_argument_named(threshold):
    with pytest.raises(InputError, match=r"threshold_bytes: expected an int in 1\.\.33554432.*got"):
        malloc.return_freed_blocks(threshold)


def test_without_glibc_the_settings_say_so_instead_of_calling_into_another_allocator(monkeypatch):
    monkeypatch.setattr(malloc, "glibc", lambda: None)
    with pytest.raises(RuntimeError, match="these settings are glibc's.*leave it as it is"):
        malloc.keep_freed_blocks()
    with pytest.raises(RuntimeError, match="these settings are glibc's"):
        malloc.return_freed_blocks()


def test_the_thp_mode_is_the_bracketed_word(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert transparent_huge_page_mode(str(mode)) == "madvise"
    mode.write_text("[always] madvise never\n")
    assert transparent_huge_page_mode(str(mode)) == "always"
    assert transparent_huge_page_mode(str(tmp_path / "missing")).startswith("unknown")


@pytest.mark.skipif(transparent_huge_page_mode() not in ("madvise", "always"),
                    reason="the kernel's transparent huge pages are off")
def test_huge_page_bytes_shows_whether_thp_mem_alloc_enable_took_effect():
    """torch marks tensors of 2 MiB or more for huge pages under THP_MEM_ALLOC_ENABLE=1 (read once, at its
    first large allocation); `huge_page_bytes` is how a user checks that it did."""
    if huge_page_bytes() is None:
        pytest.skip("needs /proc/self/smaps_rollup (Linux 4.14+)")
    child = ("import torch; from cpcbm_blocks.measure import huge_page_bytes; "
             "x = torch.ones(64 * 2**20 // 4); print(huge_page_bytes() // 2**20)")

    def in_huge_pages_mib(environment):
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                              check=False, env={"PATH": "/usr/bin:/bin", **environment})
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1])

    assert in_huge_pages_mib({"THP_MEM_ALLOC_ENABLE": "1"}) >= 32  # most of the 64 MiB tensor
    if transparent_huge_page_mode() == "madvise":  # in "always" mode the kernel may back it with huge pages anyway
        assert in_huge_pages_mib({}) == 0


def test_file_backed_rss_counts_the_pages_of_a_mapped_file_that_were_read_and_not_a_tensors(tmp_path):
    """`file_backed_rss_bytes` tells libraries' code pages (which differ between machines) from the
    process's own data: reading a mapped file raises it, filling a tensor does not."""
    import torch

    if file_backed_rss_bytes() is None:
        pytest.skip("no /proc/self/status (not Linux)")
    size = 32 * 2**20
    path = tmp_path / "pages.bin"
    path.write_bytes(b"\1" * size)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        before = file_backed_rss_bytes()
        assert sum(mapped[offset] for offset in range(0, size, 4096)) == size // 4096  # one read per page
        assert file_backed_rss_bytes() - before >= size * 3 // 4
    before = file_backed_rss_bytes()
    tensor = torch.ones(size // 4)  # anonymous memory, whether malloc maps it fresh or reuses its heap
    assert abs(file_backed_rss_bytes() - before) < size // 8
    assert file_backed_rss_bytes() < rss_bytes()
    del tensor
