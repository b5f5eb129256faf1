#!/usr/bin/env bash
# Block-diagonal HF on the MNIST deep autoencoder: one shared λ against a λ per block (solver.block_damping),
# both with the per-block cut products (solver.cut_products=true, the default), 900 s each, the two runs at
# once on the 2-core CPU machine, one thread each, seed 1 (as evidence/bdhf_2026-12-01).
#   REAL=/path/holding/mnist bash evidence/bdhf_2026-12-02/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=evidence/bdhf_2026-12-02
export HFRUN_DATASETS=${REAL:?set REAL to a directory holding mnist/}
COMMON="solver=bdhf task=mnist_autoencoder seed=1 run.threads=1 logger.progress=false run.max_updates=1000000 run.max_seconds=900 run.eval_every=5"
for damping in shared per_block; do
  rm -rf "${OUT:?}/ae_bdhf_$damping"
  .venv/bin/hfrun $COMMON solver.block_damping=$damping hydra.run.dir="$OUT/ae_bdhf_$damping" \
    > "$OUT/ae_bdhf_$damping.out" 2>&1 &
done
wait
