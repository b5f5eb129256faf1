"""Published figures hfrun's reports are set beside.

Martens & Sutskever (2011), "Learning recurrent neural networks with Hessian-free optimization", Figure 3:
a 100-unit RNN trained by HF with structural damping, minibatches of 1000 sequences, at most 50,000
minibatches, about 4 runs per entry. Per (task, T): the failure rate and the mean thousands of minibatches
to success over the successful runs (None where no run succeeded). hfrun's HF uses structural damping, so
these are the paper's structural-damping entries.
"""
from __future__ import annotations

MS2011_LENGTHS = (30, 50, 100, 200)

# task stem → per T in MS2011_LENGTHS: (failure rate, mean thousands of minibatches to success)
MS2011_FIGURE3 = {
    "addition": ((0, 1.6), (0, 3.7), (0, 3.7), (0.25, 10.0)),
    "multiplication": ((0, 4.8), (0, 6.7), (0, 9.1), (0.5, 16.2)),
    "temporal_order": ((0, 0.8), (0, 1.4), (0.25, 3.8), (0.75, 9.2)),
    "temporal_order3": ((0, 1.1), (0, 1.6), (0, 13.3), (0.5, 12.2)),
    "permutation": ((0, 0.6), (0, 0.9), (0, 3.5), (0.25, 5.1)),
    "xor": ((0, 4.6), (0, 11.8), (0.75, 10.5), (1, None)),
    "memorization5": ((0, 0.6), (0, 1.1), (0, 3.0), (0, 8.8)),
    "memorization20": ((0, 2.2), (0, 6.6), (0, 13.5), (0.5, 25.6)),
}


def ms2011_entry(task: str) -> tuple[float, float | None] | None:
    """(failure rate, k-minibatches) of M&S Figure 3 for a task named <stem>_T<T>, or None."""
    stem, _, length = task.rpartition("_T")
    if stem not in MS2011_FIGURE3 or not length.isdigit() or int(length) not in MS2011_LENGTHS:
        return None
    return MS2011_FIGURE3[stem][MS2011_LENGTHS.index(int(length))]
