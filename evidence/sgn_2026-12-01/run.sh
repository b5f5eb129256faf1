#!/usr/bin/env bash
# SGN 2020's CPU-sized benchmarks reproduced side by side with SGD on this machine (README, "SGN").
#   REAL=/path/holding/mnist/and/boston bash evidence/sgn_2026-12-01/run.sh
# One Hydra sweep per benchmark and solver; each run uses one thread, and two sweeps run at once (one per
# core), the SGN lane and the SGD lane. Budgets are the paper's wall-clock budgets (MNIST 100 s, Boston 10 s,
# sine 100 s); the paper's MNIST runs were on a GPU, these are on one CPU core each.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=evidence/sgn_2026-12-01
export HFRUN_DATASETS=${REAL:?set REAL to a directory holding mnist/ and boston/}
COMMON="run.threads=1 logger.progress=false run.max_updates=1000000"
sweep() {  # name overrides...: one Hydra multirun into $OUT/name
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  .venv/bin/hfrun -m "$@" $COMMON hydra.sweep.dir="$OUT/$name" hydra.sweep.subdir='${hydra.job.num}' \
    > "$OUT/$name.out" 2>&1 || echo "sweep $name exited $?"
}
(
  sweep sgn3_mnist solver=sgn task=mnist solver.cg_max_iters=3 seed=1,2,3 run.max_seconds=100 run.eval_every=10
  sweep sgn5_boston solver=sgn task=boston solver.cg_max_iters=5 seed=1,2,3,4,5 run.max_seconds=10 run.eval_every=10
  sweep sgn20_sine_f10 solver=sgn task=sine_f10 solver.cg_max_iters=20 seed=1,2,3 run.max_seconds=100 run.eval_every=20
  sweep sgn30_sine_f100 solver=sgn task=sine_f100 solver.cg_max_iters=30 seed=1,2,3 run.max_seconds=100 run.eval_every=20
  sweep sgd0.1_mnist solver=sgd task=mnist solver.lr=0.1 solver.momentum=0 seed=1,2,3 run.max_seconds=100 run.eval_every=100
) &
(
  sweep sgd1_mnist solver=sgd task=mnist solver.lr=1 solver.momentum=0 seed=1,2,3 run.max_seconds=100 run.eval_every=100
  sweep sgd0.01_boston solver=sgd task=boston solver.lr=0.01 solver.momentum=0 seed=1,2,3,4,5 run.max_seconds=10 run.eval_every=100
  sweep sgd0.1_sine_f10 solver=sgd task=sine_f10 solver.lr=0.1 solver.momentum=0 seed=1,2,3 run.max_seconds=100 run.eval_every=200
  sweep sgd0.1_sine_f100 solver=sgd task=sine_f100 solver.lr=0.1 solver.momentum=0 seed=1,2,3 run.max_seconds=100 run.eval_every=200
) &
wait
