# Shared by run.sh and run_first_order.sh (sourced): what a task:seed names and where its run continues.
# A task named with its length (addition_T200) runs at that length, a bare name at T = 100; addition_T100 and
# addition name one run.

# parse_spec task:seed  sets $task, $seed and $config (the task config's name)
parse_spec() {
  task=${1%%:*}; seed=${1##*:}; task=${task%_T100}
  case $task in *_T*) config=$task ;; *) config=${task}_T100 ;; esac
}

# solved DIR  succeeds when the run in DIR has solved its task
solved() { [ -e "$1/summary.json" ] && grep -q '"solved": true' "$1/summary.json"; }

# run_place DIR  the override that continues the run in DIR (from its last checkpoint) or starts it there
run_place() { if [ -e "$1/checkpoints/last.pt" ]; then echo "run.resume=$1"; else echo "hydra.run.dir=$1"; fi; }
