"""Keep freed memory in the process on the CPU, instead of handing it back to the OS at every free.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB) with mmap and returns them
with munmap, and trims the heap's top as soon as it is free. A training step allocates and frees the same
few-megabyte tensors many times over (an RNN's per-step activations, CG's vectors), so every one of them
comes back as fresh pages that the kernel must fault in and zero: on the 2-core machine this made one
GGN product of the T = 100 tanh RNN about 1.6× slower (README, "Speed"). With mmap off and trimming
postponed, freed blocks are reused from the heap, as PyTorch's CUDA caching allocator does on the GPU.

The cost: with every block in one heap, a small allocation that outlives a large temporary can leave
the temporary's hole too small for the next one, so the heap grows past the peak of live memory when
sizes change (seen in review: a 1 GiB temporary per step with a small tensor kept each time grew the
resident size to 3 GiB). `release_free_memory()`, which the engine calls after every update, hands the
pages of free blocks back to the OS (malloc_trim): memory is then reused within an update, where the
shapes repeat (CG's products), and returned between updates. The setting is process-wide and stays on
once made: in a sweep run in one process (Hydra's basic launcher), later jobs keep it.

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
_libc = None  # loaded once: find_library runs `ldconfig -p` in a subprocess, too slow for every update


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks rather than unmap them; True when it took effect."""
    global _done, _libc
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
        libc.malloc_trim  # release_free_memory needs it too: check both here
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt here; the allocator is left as it is")
        return False
    _libc = libc
    results = [mallopt(option, value) for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREE_BYTES), (M_TOP_PAD, TOP_PAD_BYTES))]
    _done = all(result == 1 for result in results)
    return _done


def release_free_memory() -> None:
    """Return the pages of free heap blocks to the OS (glibc malloc_trim), when keep_freed_memory is on."""
    if _done:
        _libc.malloc_trim(0)
