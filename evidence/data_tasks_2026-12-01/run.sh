#!/usr/bin/env bash
# The data-set tasks' evidence runs (README, "Real data sets"): one Adam and one HF run per task, 60 s each,
# one thread per run, two runs at a time on the 2-core CPU machine.
#   REAL=/path/holding/mnist/and/boston [TASKS="mnist boston"] bash evidence/data_tasks_2026-12-01/run.sh
# REAL is a directory with the real MNIST files in mnist/ and the Boston CSV in boston/ (copied from
# ../shared/data here). Fashion-MNIST and CIFAR-10 are not available on this machine: the script writes
# stand-in files in their real formats (tests/standins.py) and runs on those with task.verify=false.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=evidence/data_tasks_2026-12-01
DATA=$(mktemp -d)
cp -r "$REAL"/mnist "$REAL"/boston "$DATA"/
.venv/bin/python - "$DATA" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from standins import write_cifar_dataset, write_idx_dataset
root = Path(sys.argv[1])
write_idx_dataset(root / "fashion_mnist", train=10000, test=2000, seed=2)
write_cifar_dataset(root / "cifar10", records_per_file=2000, seed=3)
PY
export HFRUN_DATASETS="$DATA"
COMMON="run.max_seconds=60 run.max_updates=100000 run.eval_every=20 run.threads=1 logger.progress=false"
run() {  # solver task [overrides...]: one run, its directory named solver_task
  local solver=$1 task=$2; shift 2
  .venv/bin/hfrun solver="$solver" task="$task" $COMMON "$@" hydra.run.dir="$OUT/${solver}_${task}" \
    > "$OUT/${solver}_${task}.out" 2>&1 || echo "exit $?: $solver $task"
}
ALL="mnist seqmnist7 mnist_autoencoder boston sine_f10 sine_f100 fashion_mnist cifar10"
for task in ${TASKS:-$ALL}; do  # TASKS="boston sine_f10" runs a subset
  extra=""
  case $task in fashion_mnist|cifar10) extra="task.verify=false";; esac  # stand-ins: not the published files
  rm -rf "$OUT/adam_$task" "$OUT/hf_$task"
  run adam "$task" $extra &
  run hf "$task" $extra &
  wait
done
rm -rf "$DATA"
