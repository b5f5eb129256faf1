#!/bin/bash
# T = 100 under the release's definitions: HF at the task configs' defaults, one thread per run, two runs at
# a time on the 2-core machine. Each run has a wall-clock cap (CAP seconds, cumulative over resumes); a run the
# cap stopped is continued exactly by running this again with a larger CAP (it resumes from checkpoints/last.pt).
# Every run also stops at M&S 2011's failure threshold, 50k minibatches (run.max_minibatches, from 2026-12-03).
# Usage: bash run.sh OUT CAP task:seed [task:seed ...]     e.g.  bash run.sh /tmp/t100 3600 addition:0 xor:1
# A task named with its length (addition_T200:0) runs at that length; a bare name runs at T = 100.
# EXTRA, from the environment, adds overrides to every run (a candidate: EXTRA=solver.checks=release); a
# resumed run needs the same EXTRA again. THREADS (default 1) is each run's run.threads: 2 for a run alone on
# the machine.
set -u
source "$(dirname "$0")/common.sh"
out=$1; cap=$2; shift 2
for spec in "$@"; do
  parse_spec "$spec"
  dir=$out/$task/s$seed
  if solved "$dir"; then continue; fi
  where=$(run_place "$dir")
  # runs started before T >= 100 products were compiled by default (2026-12-02) continue with their own method
  if [ -e "$dir/.hydra/config.yaml" ] && ! grep -q hfrun_at_least "$dir/.hydra/config.yaml"; then
    where="$where solver.jv_method=auto"
  fi
  hfrun solver=hf task=$config seed=$seed run.max_updates=100000 run.max_seconds=$cap run.max_minibatches=50000 \
      run.eval_every=1 run.checkpoint_every=5 run.threads=${THREADS:-1} logger.progress=false $where ${EXTRA:-}
done
