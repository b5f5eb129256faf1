#!/bin/bash
# The first-order rows at T = 100 under the release's definitions: Adam (lr 1e-3) and momentum SGD (lr 0.01,
# momentum 0.9), one minibatch per update (1000 sequences; 5-bit memorization's 32), up to UPDATES minibatches
# (the budget HF needed on the same task, so the two are matched in M&S's unit), one thread per run, each run
# resumable (run.resume) like run.sh's. THREADS (default 1) is each run's run.threads: 2 for a run alone.
# Usage: bash run_first_order.sh OUT UPDATES adam|sgd task:seed [task:seed ...]
#   e.g. bash run_first_order.sh /tmp/t100fo 6000 adam addition:0 addition:1
set -u
source "$(dirname "$0")/common.sh"
out=$1; updates=$2; solver=$3; shift 3
for spec in "$@"; do
  parse_spec "$spec"
  dir=$out/$solver/$task/s$seed
  if solved "$dir"; then continue; fi
  hfrun solver=$solver task=$config seed=$seed run.max_updates=$updates run.eval_every=50 \
      run.checkpoint_every=500 run.threads=${THREADS:-1} logger.progress=false $(run_place "$dir")
done
