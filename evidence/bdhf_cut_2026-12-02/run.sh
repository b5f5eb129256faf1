#!/usr/bin/env bash
# BDHF (cut products, the default since 2026-12-02) against HF and Adam, every solver at its defaults, on the
# 2-core CPU machine: two lanes at once, one thread per run. Seeds 1 and 2 on the autoencoder (30 minutes each
# for HF, BDHF and Adam), the curvature batch sizes (120 s each, seed 1), the LSTM (300 s each), and what a CIFAR
# ResNet update costs on stand-in files.
#   REAL=/path/holding/mnist bash evidence/bdhf_cut_2026-12-02/run.sh lane1 &
#   REAL=/path/holding/mnist bash evidence/bdhf_cut_2026-12-02/run.sh lane2 && REAL=... bash ... run.sh lane3 &
# Tables: python evidence/bdhf_cut_2026-12-02/table.py (from each run's metrics.jsonl and summary.json).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=evidence/bdhf_cut_2026-12-02
export HFRUN_DATASETS=${REAL:?set REAL to a directory holding mnist/}
COMMON="run.threads=1 logger.progress=false run.max_updates=1000000"
one() {  # name seed overrides...
  local name=$1 seed=$2; shift 2
  rm -rf "${OUT:?}/$name"
  echo "$(date +%T) start $name"
  .venv/bin/hfrun $COMMON seed=$seed "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.out" 2>&1 || echo "run $name exited $?"
}
AE="task=mnist_autoencoder run.max_seconds=1800"
curvature_batches() {  # seed: HF and BDHF on the autoencoder at each curvature batch size, 120 s each
  for size in 100 300 1000 3000; do
    for solver in hf bdhf; do
      one curv${size}_${solver}_s$1 $1 solver=$solver task=mnist_autoencoder solver.curvature_batch_size=$size \
        run.max_seconds=120 run.eval_every=5
    done
  done
}
case ${1:?lane1, lane2 or lane3} in
  lane1)
    one ae_hf_s1 1 solver=hf $AE run.eval_every=5
    one ae_bdhf_s2 2 solver=bdhf $AE run.eval_every=5
    one ae_adam_s2 2 solver=adam $AE run.eval_every=100
    curvature_batches 1 ;;
  lane2)
    one ae_bdhf_s1 1 solver=bdhf $AE run.eval_every=5
    one ae_adam_s1 1 solver=adam $AE run.eval_every=100
    one ae_hf_s2 2 solver=hf $AE run.eval_every=5
    for solver in bdhf hf; do
      one lstm_${solver}_s1 1 solver=$solver task=seqmnist7 run.max_seconds=300 run.eval_every=5
    done
    one lstm_adam_s1 1 solver=adam task=seqmnist7 run.max_seconds=300 run.eval_every=50
    STANDIN=$(mktemp -d)
    .venv/bin/python -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from standins import write_cifar_dataset
write_cifar_dataset(Path('$STANDIN') / 'cifar10', records_per_file=10000, seed=3)"
    C="task=cifar10 model=resnet task.data_dir=$STANDIN task.verify=false task.eval_size=1000"
    one cifar_resnet_bdhf_s1 1 solver=bdhf $C run.max_updates=2 run.eval_every=2
    one cifar_resnet_hf_s1 1 solver=hf $C run.max_updates=2 run.eval_every=2
    one cifar_resnet_adam_s1 1 solver=adam $C run.max_updates=20 run.eval_every=20
    rm -rf "$STANDIN" ;;
  lane3)  # after lane2: the curvature batch sizes again, seed 2
    curvature_batches 2 ;;
esac
