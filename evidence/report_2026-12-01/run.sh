#!/usr/bin/env bash
# hfrun-report's figure from a real sweep (README, "Sweeps"): SGN(3) and SGD (lr 1, no momentum; the SGN
# paper's MNIST comparison) on real MNIST, 2 seeds each, 60 s per run, two runs at a time through the joblib
# launcher (one CPU thread each on this 2-core machine).
#   REAL=/path/holding/mnist bash evidence/report_2026-12-01/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=evidence/report_2026-12-01
export HFRUN_DATASETS=${REAL:?set REAL to a directory holding mnist/}
COMMON="hydra/launcher=joblib hydra.launcher.n_jobs=2 task=mnist seed=1,2 run.max_seconds=60 run.max_updates=1000000
        logger.progress=false"
rm -rf "$OUT/sgn3" "$OUT/sgd1"
.venv/bin/hfrun -m $COMMON solver=sgn solver.cg_max_iters=3 run.eval_every=25 hydra.sweep.dir="$OUT/sgn3" \
  > "$OUT/sgn3.out" 2>&1
.venv/bin/hfrun -m $COMMON solver=sgd solver.lr=1 solver.momentum=0 run.eval_every=200 hydra.sweep.dir="$OUT/sgd1" \
  > "$OUT/sgd1.out" 2>&1
.venv/bin/hfrun-report "$OUT/sgn3" "$OUT/sgd1" --format markdown --plot "$OUT/mnist_sgn_sgd.png" | tee "$OUT/table.md"
