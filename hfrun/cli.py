"""The `hfrun` command: Hydra composes the config, the engine runs it.

Exit status: 0 when the run ended by its own outcome (solved, budget, early_stopped, stalled, interrupted);
1 when it was refused (bad config, unusable checkpoint or directory; nothing is left behind), diverged, or
could not write its files. A sweep (-m) runs every job and then exits 1 if any job failed (hfrun.rundir).
"""
from __future__ import annotations

import math
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hfrun import distributed
from hfrun.config import CONFIG_DIR, register_resolvers
from hfrun.engine import Run
from hfrun.errors import HfrunError
from hfrun.logging import console, print_error, print_summary, record
from hfrun.rundir import selected, undo_start
from hfrun.summary import write_summary

register_resolvers()


def _sweep_job_failed(cfg: DictConfig, run_dir: Path, message: str) -> float:
    """In a sweep, a job that cannot run leaves its reason in its own summary.json; the sweep goes on."""
    try:
        write_summary(run_dir / "summary.json", {"task": selected(cfg, "task.name"),
                                                 "solver": selected(cfg, "solver.name"), "seed": selected(cfg, "seed"),
                                                 "status": "error", "message": message, "run_dir": str(run_dir)})
    except HfrunError as error:
        print_error(str(error))
    return math.inf


def train_job(cfg: DictConfig) -> float:
    """Train one configuration; return the value a sweep minimizes (the best validation objective).

    A module-level function, decorated below rather than here, so that launchers that send jobs to other
    processes (joblib, submitit) pickle it by reference instead of by value with its module's globals."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        run = Run(cfg, run_dir)
    except HfrunError as error:  # refused before the first update
        print_error(str(error))
        if sweep:
            return _sweep_job_failed(cfg, run_dir, str(error))
        undo_start()
        sys.exit(1)
    except Exception as error:  # a bug or a case no check foresaw: say so, and still leave nothing behind
        if sweep:
            record.exception("The job could not start")  # the traceback goes to run.log only
            return _sweep_job_failed(cfg, run_dir, f"{type(error).__name__}: {error}")
        undo_start()
        raise
    try:
        summary = run.train()
    except HfrunError as error:  # a run file could not be written; summary.json says so where it could be
        print_error(str(error))
        if sweep:
            return math.inf
        sys.exit(1)
    except Exception as error:
        if not sweep:
            raise
        record.exception("The job failed")  # the traceback goes to run.log only
        print_error(f"{type(error).__name__}: {error} (traceback in {run_dir / 'run.log'})")
        return math.inf
    if not sweep and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over and saved: a late Ctrl-C has nothing to stop
    distributed.leave()
    if not run.parallel.is_main:  # rank 0 reports for the data-parallel run
        return math.inf if summary["status"] == "diverged" else 0.0
    print_summary(summary)
    console.print(f"run directory: [bold]{run.run_dir}[/]")
    record.info("run directory: %s", run.run_dir)
    if summary["status"] == "diverged":
        print_error(summary["message"])
        if not sweep:
            sys.exit(1)
        return math.inf
    # A success found only at the final evaluation has no scheduled best yet: the final figure stands for it.
    best = summary.get(f"best_val_{summary['objective']}")
    best = summary.get(f"final_val_{summary['objective']}") if best is None else best
    return math.inf if best is None else best


hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(train_job)


def main() -> None:
    """`hfrun ...`, also as one process of `torchrun --nproc_per_node=N -m hfrun.cli ...` (data parallel).

    Under torchrun, processes other than rank 0 write nothing to the run directory: Hydra's files for them
    go to a temporary directory, removed at the end, and the run's directory is rank 0's (Hydra's ${now}
    differs from process to process, so the others could not compute it themselves)."""
    if distributed.launched_world_size() > 1 and {"-m", "--multirun"} & set(sys.argv[1:]):
        print_error("A sweep (-m) cannot run under torchrun: start one torchrun per configuration (see the "
                    "README, Data parallelism).", to_run_log=False)
        sys.exit(1)
    if distributed.launched_rank() == 0:
        hydra_main()
        return
    scratch = tempfile.mkdtemp(prefix=f"hfrun_rank{distributed.launched_rank()}_")
    sys.argv = [argument for argument in sys.argv if not argument.startswith(("hydra.run.dir=",
                                                                              "hydra.output_subdir="))]
    sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "logger.progress=false",
                 "logger.tensorboard=false"]
    try:
        hydra_main()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
