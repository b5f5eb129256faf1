#!/bin/bash
# Throughput of HF on 1 process (1 thread) and on 2 processes (1 thread each), the same global batches.
# usage: run.sh OUTDIR TASKARGS...
out=$1; shift
cd "$(dirname "$0")/../.."  # the repository root
export OMP_NUM_THREADS=1
mkdir -p "$out"; rm -rf $out/one $out/two
/usr/bin/time -f "one process: %e s wall" .venv/bin/hfrun "$@" run.threads=1 logger.progress=false hydra.run.dir=$out/one > $out/one.log 2>&1
/usr/bin/time -f "two processes: %e s wall" .venv/bin/torchrun --standalone --nproc_per_node=2 -m hfrun.cli "$@" run.threads=1 logger.progress=false hydra.run.dir=$out/two > $out/two.log 2>&1
tail -1 $out/one.log; tail -1 $out/two.log
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("one", "two"):
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if '"kind": "update"' in l]
    later = rows[1:]  # the first update also traces the products
    wall = sum(r["time_gradient_s"] + r["time_cg_s"] + r["time_line_search_s"] for r in later)
    coll = sum(r.get("time_collective_s", 0.0) for r in later)
    trace = sum(r.get("time_trace_s", 0.0) for r in later)
    mb = ((rows[-1]["examples_grad"] + rows[-1]["examples_curv"]) - (rows[0]["examples_grad"] + rows[0]["examples_curv"])) / 1000
    cg = sum(r["cg_iters"] for r in later)
    print(f"{name}: updates 2..{len(rows)}: {wall:.1f} s, {mb:.0f} minibatches, {1000*wall/mb:.1f} ms/minibatch, "
          f"CG iterations {cg}, all-reduce {coll:.2f} s ({100*coll/wall:.1f}%), tracing {trace:.1f} s")
PY
