"""Traced products with and without `drop_zero_terms` (hfrun/traced.py): the floats the primal half hands to
every product, and the per-batch set-up and one product (ms, medians), for make bench's workloads.
    OMP_NUM_THREADS=1 python evidence/rnn_speed_2026-12-02/zero_terms.py"""
import statistics, time
import torch
from hfrun.allocator import keep_freed_memory
from hfrun import bench, traced
from hfrun.curvature import CurvatureOperator

torch.set_num_threads(1); torch.set_flush_denormal(True); keep_freed_memory(); torch.manual_seed(0)
drop_zero_terms = traced.drop_zero_terms
wanted = ("MLP 784-256-256-10, B5000", "autoencoder 784-…-30-…-784, B1000", "tanh RNN-100 T100 B1000, analytic",
          "tanh RNN-100 T100 B1000, analytic, structural damping")


def median_ms(work, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); work(); times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


for workload in bench.workloads(torch.device("cpu"), 1.0, compiled=False):
    if workload.jv_method != "traced" or workload.name not in wanted:
        continue
    for label, dropping in (("without the pass", False), ("with the pass", True)):
        traced.drop_zero_terms = drop_zero_terms if dropping else (lambda graph_module: graph_module)
        traced._TRACES.clear()

        def setup():
            return CurvatureOperator(workload.model, workload.loss, workload.batch, damping=1.0, jv_method="traced",
                                     structural_damping=workload.structural_damping)
        operator = setup()
        trace = list(traced._TRACES[workload.model].values())[-1]
        outputs = next(node for node in trace.primal.graph.nodes if node.op == "output").args[0]
        floats = sum(node.meta["val"].numel() for node in outputs[1:] if "val" in node.meta)
        vector = torch.randn(operator.num_params)
        operator.mv(vector)
        print(f"{workload.name:55s} {label:17s} handed over {floats / 1e6:5.1f}M floats   set-up "
              f"{median_ms(setup):6.1f} ms   product {median_ms(lambda: operator.mv(vector)):6.1f} ms")
traced.drop_zero_terms = drop_zero_terms
