"""Keep freed memory in the process on the CPU, instead of handing it back to the OS at every free.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB) with mmap and returns them
with munmap, and trims the heap's top as soon as it is free. A training step allocates and frees the same
few-megabyte tensors many times over (an RNN's per-step activations, CG's vectors), so every one of them
comes back as fresh pages that the kernel must fault in and zero: on the 2-core machine this made one
GGN product of the T = 100 tanh RNN 1.7–2× slower (`make bench`, rows with and without it). With mmap
off and trimming postponed, freed blocks are reused from the heap, as PyTorch's CUDA caching allocator
does on the GPU. The cost: the process keeps its peak memory until it exits.

Written by hand because the library route (jemalloc or tcmalloc through LD_PRELOAD, set before the
process starts) needs a system package and a wrapper around every command; mallopt is part of glibc.
Elsewhere (macOS, musl) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP_FREE_BYTES = 2**31 - 1  # trim the heap only when this much is free at its top
TOP_PAD_BYTES = 64 * 2**20  # grow the heap in steps of this much more than asked

_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks rather than unmap them; True when it took effect."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt here; the allocator is left as it is")
        return False
    _done = all(mallopt(option, value) == 1 for option, value in
                ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREE_BYTES), (M_TOP_PAD, TOP_PAD_BYTES)))
    return _done
