"""The analytic RNN rows of `make bench` with traced and compiled products, and the plain-loop model, one thread:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python evidence/rnn_speed_2026-12-02/compiled_rows.py"""
import torch
torch.set_num_threads(1); torch.set_flush_denormal(True)
from hfrun.allocator import keep_freed_memory; keep_freed_memory()
from hfrun import bench
torch.manual_seed(0)
dev = torch.device("cpu")
for w in bench.workloads(dev, 1.0, compiled=True):
    if "analytic" in w.name and w.jv_method in ("traced", "compiled") or ("plain-loop" in w.name and w.jv_method == "traced"):
        r = bench.measure(w, dev, 5)
        print(f"{w.name} ({r['jv_method_used']}): grad {r['grad_ms']:.1f} gvp {r['gvp_ms']:.1f} gvp/grad {r['gvp/grad']:.2f} setup {r['setup_ms']:.1f} trace {r['trace_ms']:.0f} hf10 {r['hf10_ms']:.0f} peer {r['peer10_ms']:.0f} hf10/peer {r['hf10/peer']:.2f}", flush=True)
