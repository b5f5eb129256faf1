#!/bin/bash
# OpenMP's default wait policy (idle threads spin) against OMP_WAIT_POLICY=PASSIVE (they sleep), alternating, on
# a quiet machine: the Quick start's command and 8 updates of addition_T30, 2 threads each (torch's default).
# Usage, from the repository root with nothing else running: bash evidence/omp_wait_policy_2026-12-03/run.sh OUT
out=${1:-/tmp/omp_wait_policy}
mkdir -p "$out"
for rep in 1 2; do
  for policy in default PASSIVE; do
    for cmd in "task=temporal_order_T30 run.eval_every=1 run.max_seconds=120" "task=addition_T30 run.eval_every=1 run.max_updates=8"; do
      name=$(echo "$cmd" | cut -d' ' -f1 | cut -d= -f2)
      dir=$out/$name-$policy-$rep
      if [ $policy = default ]; then setting="-u OMP_WAIT_POLICY"; else setting="OMP_WAIT_POLICY=PASSIVE"; fi
      env $setting .venv/bin/hfrun solver=hf $cmd logger.progress=false hydra.run.dir=$dir > $dir.log 2>&1
      python3 -c "import json; d=json.load(open('$dir/summary.json')); print('$name $policy $rep', d['status'], d['updates'], d['wall_time_s'], d['final_val_loss'])"
    done
  done
done
