"""Where one HF update (10 CG iterations, the bench's analytic RNN) spends its time, by cProfile, one thread:
    python evidence/rnn_speed_2026-12-02/hf_update_profile.py traced|compiled"""
import cProfile, pstats, sys, torch, copy, time
torch.set_num_threads(1); torch.set_flush_denormal(True)
from hfrun.allocator import keep_freed_memory; keep_freed_memory()
from hfrun import bench
from hfrun.solvers.hf import HessianFree
torch.manual_seed(0)
dev = torch.device("cpu")
method = sys.argv[1]
w = [w for w in bench.workloads(dev, 1.0) if w.name.endswith("analytic") and w.jv_method == method][0]
model = copy.deepcopy(w.model)
solver = HessianFree(model, w.loss, gradient_batch_size=w.batch.size, cg_max_iters=bench.HF_CG_ITERS, cg_tol=0.0,
                     initial_damping=bench.HF_DAMPING, preconditioner="none", jv_method=method)
stream = bench.FixedBatch(w.batch)
solver.step(stream); solver.step(stream)
pr = cProfile.Profile(); pr.enable()
t0 = time.perf_counter()
for _ in range(3): s = solver.step(stream)
print("step ms", (time.perf_counter() - t0) / 3 * 1000, s)
pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(35)
