"""The analytic RNN's gradient with each step written into one preallocated output (the default since
2026-12-02's third session) against the same recurrence stacking its steps (the earlier code, restored by
making `_writes_into_buffers` say no), both against the plain loop, in interleaved rounds in one process:
tanh RNN-100, T = 100, 1000 sequences, loss on the last step, as `make bench`'s gradient table.
    python evidence/rnn_speed_2026-12-02/recurrence_buffers.py [threads] [rounds]"""
import statistics, sys, time
import torch
from hfrun.allocator import keep_freed_memory
from hfrun.bench import PlainLoopRNN, rnn_gradient_work
from hfrun.losses import SquaredError
from hfrun.models import recurrence
from hfrun.models.rnn import RNN
from hfrun.tasks.base import Batch

threads, rounds = (int(sys.argv[1]) if len(sys.argv) > 1 else 2), (int(sys.argv[2]) if len(sys.argv) > 2 else 15)
torch.set_num_threads(threads); torch.set_flush_denormal(True); keep_freed_memory(); torch.manual_seed(0)
inputs, targets = torch.randn(1000, 100, 2), torch.randn(1000, 100, 1)
mask = torch.zeros(1000, 100); mask[:, -1] = 1
loss, plain, analytic = SquaredError(), PlainLoopRNN(2, 100, 1), RNN(2, 1)
writes_into_buffers = recurrence._writes_into_buffers


def gradient(model, with_preactivations, stacked=False):
    work = rnn_gradient_work(model, loss, Batch(inputs, targets, mask), with_preactivations)

    def switched():
        recurrence._writes_into_buffers = (lambda *tensors: False) if stacked else writes_into_buffers
        try:
            return work()
        finally:
            recurrence._writes_into_buffers = writes_into_buffers
    return switched


for pre in (False, True):
    suffix = ", with pre-activations" if pre else ""
    works = {"plain loop" + suffix: gradient(plain, pre), "analytic, stacked steps" + suffix: gradient(analytic, pre, True),
             "analytic, buffers" + suffix: gradient(analytic, pre)}
    for expected, actual in zip(works["analytic, stacked steps" + suffix](), works["analytic, buffers" + suffix]()):
        assert torch.equal(expected, actual), "the two paths differ"
    times = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            start = time.perf_counter(); work(); times[name].append(time.perf_counter() - start)
    reference = times["plain loop" + suffix]
    stacked = times["analytic, stacked steps" + suffix]
    for name, values in times.items():
        print(f"{name:45s} {1000 * statistics.median(values):7.1f} ms   / plain loop "
              f"{statistics.median(v / r for v, r in zip(values, reference)):.3f}   / stacked "
              f"{statistics.median(v / s for v, s in zip(values, stacked)):.3f}")
print(f"{threads} threads, {rounds} interleaved rounds, torch {torch.__version__}")
