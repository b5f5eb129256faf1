"""keep_freed_memory changes glibc's malloc options only; results stay exact."""
from __future__ import annotations

import subprocess
import sys

from hfrun.allocator import keep_freed_memory

SCRIPT = """
import torch
from hfrun.allocator import keep_freed_memory
torch.manual_seed(0)
x = torch.randn(2000, 3000)
before = (x @ x.T).sum(1)
assert keep_freed_memory() and keep_freed_memory()  # takes effect, and a second call is harmless
for _ in range(5):  # allocate and free large blocks, which now come back from the heap
    y = torch.randn(2000, 3000)
    del y
torch.manual_seed(0)
x = torch.randn(2000, 3000)
assert torch.equal((x @ x.T).sum(1), before)
print("ok")
"""


def test_keep_freed_memory_takes_effect_and_leaves_results_alone():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_keep_freed_memory_reports_whether_it_took_effect():
    assert isinstance(keep_freed_memory(), bool)


RELEASE_SCRIPT = """
import torch
from hfrun.allocator import keep_freed_memory, release_free_memory

def resident_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20

assert keep_freed_memory()
big = torch.ones(50 * 2**20)  # 200 MiB from the heap, as mmap is off
kept = torch.ones(100)  # a small block that outlives it, above it in the heap
del big
held = resident_mib()
release_free_memory()
assert held - resident_mib() > 150, (held, resident_mib())
print("ok")
"""


def test_release_free_memory_hands_free_pages_back():
    result = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
