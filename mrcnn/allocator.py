"""How this process's C heap (glibc malloc) serves TensorFlow's CPU kernels.

TensorFlow's oneDNN convolutions allocate their reorder buffers (one to a few MB each, tens
per training step) with `posix_memalign` and free them at once. glibc hands a block of that
size out as a fresh `mmap` of zeroed pages (or grows a heap it trimmed back a moment before),
so every step page-faults and zeroes hundreds of MB and unmaps it again. With Keras' `fit`
on a Python data source this took a third of the step on a 2-core CPU (benchmarks/RESULTS.md,
"The C heap"); the same step from preloaded batches hid it. Keeping freed blocks in the heap
(no `mmap` for large blocks, no trimming of its top) removes the faults and a third of the
step (benchmarks/bench_malloc.py: 369 -> 249 ms, 61,000 -> 150 page faults a step).

`tune_malloc()` does that through glibc's `mallopt`, once per process, from
`MaskRCNN.__init__` when `config.TUNE_MALLOC` is true (the default). It changes no result,
only where freed memory waits: the process keeps its peak heap instead of returning it to
the system between steps. Elsewhere than glibc (macOS, musl, a preloaded jemalloc or
tcmalloc, which keep their own caches) it does nothing.
"""

import ctypes
import platform

# mallopt parameters (glibc's <malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# The largest free top of the heap kept rather than returned to the system (mallopt takes
# an int).
TRIM_THRESHOLD = 2 ** 31 - 1

_state = {"tuned": None}


def glibc():
    """The process's glibc as a ctypes library, or None when the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")     # glibc's soname on every Linux it runs on
    except OSError:
        return None


def tune_malloc():
    """Keep large freed blocks in glibc's heap (see the module's doc). Returns True when the
    settings are in effect (now or from an earlier call), False when this is not glibc or it
    refused them. Call it before the work it should speed up; it applies to later
    allocations, in every thread, and to processes forked afterwards (the loader's workers).
    """
    if _state["tuned"] is None:
        libc = glibc()
        _state["tuned"] = bool(
            libc is not None
            and libc.mallopt(M_MMAP_MAX, 0) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _state["tuned"]
