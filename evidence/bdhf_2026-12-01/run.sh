#!/usr/bin/env bash
# Block-diagonal HF against HF and Adam (README, "Block-diagonal HF"), on the 2-core CPU machine:
# two lanes of runs at once, one thread per run.
#   REAL=/path/holding/mnist bash evidence/bdhf_2026-12-01/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=evidence/bdhf_2026-12-01
export HFRUN_DATASETS=${REAL:?set REAL to a directory holding mnist/}
COMMON="run.threads=1 logger.progress=false run.max_updates=1000000 seed=1"
# These runs predate solver.cut_products (2026-12-02): BDHF then took full products masked to each block.
AS_THEN="solver.cut_products=false"
one() {  # name overrides...
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  .venv/bin/hfrun $COMMON "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.out" 2>&1 || echo "run $name exited $?"
}
STANDIN=$(mktemp -d)
.venv/bin/python -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from standins import write_cifar_dataset
write_cifar_dataset(Path('$STANDIN') / 'cifar10', records_per_file=10000, seed=3)"
(
  # SGN's release flaws, measured (README, "SGN"): rejecting uphill steps, guarding the ratio; Boston, 10 s, 5 seeds
  for option in reject_uphill guard_ratio; do
    rm -rf "$OUT/../sgn_2026-12-01/sgn5_boston_$option"
    .venv/bin/hfrun -m solver=sgn task=boston solver.cg_max_iters=5 solver.$option=true seed=1,2,3,4,5 \
      run.max_seconds=10 run.eval_every=10 run.threads=1 logger.progress=false run.max_updates=1000000 \
      hydra.sweep.dir="$OUT/../sgn_2026-12-01/sgn5_boston_$option" > /dev/null 2>&1 || echo "sweep $option failed"
  done
  # 1. the MNIST deep autoencoder: HF and BDHF 1,800 s (run for 600 s, then resumed with
  #    run.max_seconds=1800 run.resume=<dir>, which continues exactly), Adam 600 s
  one ae_hf solver=hf task=mnist_autoencoder run.max_seconds=1800 run.eval_every=5
  one ae_bdhf solver=bdhf $AS_THEN task=mnist_autoencoder run.max_seconds=1800 run.eval_every=5
  # 3. the 3-layer LSTM on sequential MNIST, 300 s each
  one lstm_bdhf solver=bdhf $AS_THEN task=seqmnist7 run.max_seconds=300 run.eval_every=5
  one cifar_resnet_bdhf solver=bdhf $AS_THEN task=cifar10 model=resnet task.data_dir=$STANDIN task.verify=false \
    task.eval_size=1000 run.max_updates=1 run.eval_every=1
) &
(
  one ae_adam solver=adam task=mnist_autoencoder run.max_seconds=600 run.eval_every=100
  # 2. the curvature batch: HF and BDHF on the autoencoder at 100, 300, 1000, 3000 cases, 120 s each
  for size in 100 300 1000 3000; do
    for solver in hf bdhf; do
      one curv${size}_$solver solver=$solver $([ $solver = bdhf ] && echo "$AS_THEN") task=mnist_autoencoder \
        solver.curvature_batch_size=$size \
        run.max_seconds=120 run.eval_every=5
    done
  done
  one lstm_hf solver=hf task=seqmnist7 run.max_seconds=300 run.eval_every=5
  one lstm_adam solver=adam task=seqmnist7 run.max_seconds=300 run.eval_every=50
  # 4. the ResNet on CIFAR-10 stand-in files (full size, 50,000 + 10,000): what one update costs
  C="task=cifar10 model=resnet task.data_dir=$STANDIN task.verify=false task.eval_size=1000"
  one cifar_resnet_hf solver=hf $C run.max_updates=2 run.eval_every=2
  one cifar_resnet_adam solver=adam $C run.max_updates=20 run.eval_every=20
) &
wait
rm -rf "$STANDIN"
