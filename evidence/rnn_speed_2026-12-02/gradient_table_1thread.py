"""The RNN gradient table of `make bench` on one thread (interleaved rounds, 15 of them):
    python evidence/rnn_speed_2026-12-02/gradient_table_1thread.py"""
import torch

from hfrun import bench
from hfrun.allocator import keep_freed_memory

torch.set_num_threads(1)
torch.set_flush_denormal(True)
keep_freed_memory()
bench.rnn_gradient_table(torch.device("cpu"), 1.0, 15)
