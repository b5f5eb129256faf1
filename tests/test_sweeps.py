"""Sweeps on Hydra's own plugins: the joblib and submitit-local launchers run two jobs each with their CPU
threads shared out; an Optuna study runs its trials, a failing trial does not stop it; the SLURM config
composes. Each is a real `hfrun -m` process on linreg."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

SHORT = ["task=linreg", "run.max_updates=10", "run.eval_every=5", "logger.progress=false", "logger.tensorboard=false"]


def hfrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "hfrun"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def threads_of(run_dir: Path) -> int:
    return int(re.search(r"device cpu, (\d+) threads", (run_dir / "run.log").read_text()).group(1))


def summaries(sweep: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sweep.glob("*/summary.json")}


def test_joblib_launcher_runs_jobs_side_by_side_with_the_cores_shared(tmp_path):
    sweep = tmp_path / "sweep"
    result = hfrun("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "solver=sgd,adam", *SHORT,
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = summaries(sweep)
    assert {run["solver"] for run in runs.values()} == {"sgd", "adam"}
    assert all(run["status"] == "budget" and run["updates"] == 10 for run in runs.values())
    assert {threads_of(sweep / job) for job in runs} == {max(1, (os.cpu_count() or 1) // 2)}


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = hfrun("-m", "hydra/launcher=submitit_local", "solver=sgd,adam", *SHORT, f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = summaries(sweep)
    assert len(runs) == 2 and all(run["status"] == "budget" for run in runs.values())
    assert {threads_of(sweep / job) for job in runs} == {1}, "the local executor starts every job at once"


def test_optuna_study_runs_its_trials_and_survives_a_failing_one(tmp_path):
    sweep = tmp_path / "sweep"
    # lr = −1 is refused by the config check: that trial fails (inf), the study goes on.
    result = hfrun("-m", "hparams_search=adam_lr", "hydra.sweeper.n_trials=4",
                   "solver.lr=choice(0.01,0.03,-1.0)", *SHORT, f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    runs = summaries(sweep)
    assert len(runs) == 4, result.stderr
    statuses = sorted(run["status"] for run in runs.values())
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and best["best_params"]["solver.lr"] in (0.01, 0.03)
    assert "error" in statuses and statuses.count("budget") >= 2, statuses
    assert result.returncode == 1, "a failed trial makes the sweep exit 1 once every trial has run"


def test_slurm_launcher_config_names_the_keys_a_user_sets(tmp_path):
    result = hfrun("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert {"timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "array_parallelism"} <= set(launcher)
