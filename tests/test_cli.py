"""The real `hfrun` command in a subprocess, as a user runs it."""
from __future__ import annotations

import json

from conftest import run_hfrun

TINY = ["solver.lr=0.01", "run.max_updates=20", "run.eval_every=10"]


def test_single_run_prints_run_directory_and_writes_it(tmp_path):
    result = run_hfrun("solver=adam", "task=linreg", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dirs = list((tmp_path / "outputs" / "linreg" / "adam").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert "run directory" in result.stderr and run_dir.name in result.stderr.replace("\n", "")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.pt", "checkpoints/best.pt",
                 "summary.json", "run.log"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 20
    assert "Traceback" not in result.stderr


def test_resume_continues_in_the_same_directory(tmp_path):
    run_dir = tmp_path / "a_run"
    first = run_hfrun(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_hfrun("solver.lr=0.01", "run.max_updates=40", "run.eval_every=10", f"run.resume={run_dir}",
                      cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Resumed from update 20" in (run_dir / "run.log").read_text()
    # The original command's record stays; the resume adds its own beside it.
    assert "run.resume" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert len(list((run_dir / ".hydra").glob("resume_*/overrides.yaml"))) == 1
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 40


def test_help_and_cfg_job(tmp_path):
    help_text = run_hfrun("--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "task: " in help_text.stdout and "solver: " in help_text.stdout
    job = run_hfrun("--cfg", "job", "solver=sgd", cwd=tmp_path)
    assert job.returncode == 0 and "_target_: hfrun.solvers.first_order.SGD" in job.stdout


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    result = run_hfrun("-m", "solver=sgd,adam", "seed=0,1", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = sorted(tmp_path.glob("outputs/multirun/*/*/summary.json"))
    assert len(summaries) == 4
    seen = {(s["solver"], s["seed"]) for s in map(lambda p: json.loads(p.read_text()), summaries)}
    assert seen == {("sgd", 0), ("sgd", 1), ("adam", 0), ("adam", 1)}


def test_unknown_task_is_one_paragraph_not_a_traceback(tmp_path):
    result = run_hfrun("task=nope", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'task/nope'" in result.stderr and "linreg" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_solver(tmp_path):
    result = run_hfrun("solver=nope", cwd=tmp_path)
    assert result.returncode != 0 and "Could not find 'solver/nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_task_without_its_length_is_explained(tmp_path):
    result = run_hfrun("solver=hf", "task=addition", "run.max_updates=1", cwd=tmp_path)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "task.T must be set" in message and "task=addition_T30" in message
    assert "Traceback" not in result.stderr


def test_wrong_type_override_is_explained(tmp_path):
    result = run_hfrun("run.max_updates=abc", cwd=tmp_path)
    assert result.returncode == 1
    assert "run.max_updates must be a positive integer, got 'abc'" in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr


def test_resume_path_without_checkpoint(tmp_path):
    result = run_hfrun(f"run.resume={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 1 and "No checkpoint at" in result.stderr
    assert "Traceback" not in result.stderr


def test_diverged_run_exits_nonzero_with_message(tmp_path):
    result = run_hfrun("solver=sgd", "solver.lr=1e6", "run.max_updates=50", cwd=tmp_path)
    assert result.returncode == 1
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads(next(tmp_path.glob("outputs/linreg/sgd/*/summary.json")).read_text())
    assert summary["status"] == "diverged"
