"""Peak-memory growth (MiB) of one RNN gradient with its pre-activations (tanh RNN-100, 1000 sequences) in a
fresh process, with the recurrence writing its steps into preallocated outputs ("buffers", the default) or
stacking them ("stacked", the earlier code, restored by making `_writes_into_buffers` say no).
    for T in 100 200; do for m in stacked buffers; do python evidence/rnn_speed_2026-12-02/gradient_memory.py $T $m; done; done"""
import resource, sys
import torch
from hfrun.allocator import keep_freed_memory
from hfrun.losses import SquaredError
from hfrun.models import recurrence
from hfrun.models.rnn import RNN

keep_freed_memory(); torch.set_flush_denormal(True); torch.manual_seed(0)
steps, mode = int(sys.argv[1]), sys.argv[2]
if mode == "stacked":
    recurrence._writes_into_buffers = lambda *tensors: False
inputs, targets = torch.randn(1000, steps, 2), torch.randn(1000, steps, 1)
mask = torch.zeros(1000, steps); mask[:, -1] = 1
model, loss = RNN(2, 1), SquaredError()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
z, a = model.forward_with_preactivations(inputs)
torch.autograd.grad(loss(z, targets, mask) + 0.0 * a.sum(), list(model.parameters()))
print(f"T = {steps}, {mode}: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before:.0f} MiB")
