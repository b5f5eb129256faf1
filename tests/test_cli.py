"""The real `hfrun` command in a subprocess, as a user runs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_hfrun
from omegaconf import OmegaConf

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
    assert "powered by Hydra" not in help_text.stdout
    for fragment in ("hfrun: train neural networks", "run.max_seconds", "summary.json", "--resolve", "Exit status"):
        assert fragment in help_text.stdout, fragment
    resolved = run_hfrun("--cfg", "job", "--resolve", "solver=hf", cwd=tmp_path)
    assert resolved.returncode == 0 and "gradient_batch_size: 2000" in resolved.stdout
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


def test_resume_path_without_checkpoint_creates_nothing(tmp_path):
    result = run_hfrun(f"run.resume={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 1 and "No checkpoint at" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def _errors_in(stderr: str) -> int:
    return stderr.count("hfrun error:")


@pytest.mark.parametrize("overrides,fragment", [
    (["task=addition", "task.T=abc"], "task.T must be an integer, got 'abc'"),
    (["model=mlp", "task=addition_T30"], "hfrun.models.mlp.MLP does not fit the task addition_T30"),
    (["solver.lr=abc"], "solver.lr must be a number, got 'abc' (str). Example: solver.lr=0.01."),
])
def test_a_refused_start_says_why_once_and_leaves_nothing(tmp_path, overrides, fragment):
    result = run_hfrun(*overrides, cwd=tmp_path)
    assert result.returncode == 1
    assert fragment in " ".join(result.stderr.split())
    assert _errors_in(result.stderr) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "a refused start left files behind"


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
    run_dir = tmp_path / "a_run"
    assert run_hfrun(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = {path: path.stat().st_size for path in run_dir.rglob("*") if path.is_file()}
    refused = run_hfrun("solver=sgd", "solver.lr=0.01", f"run.resume={run_dir}", cwd=tmp_path)
    assert refused.returncode == 1 and "was started with a different config" in " ".join(refused.stderr.split())
    after = {path: path.stat().st_size for path in run_dir.rglob("*") if path.is_file()}
    assert after == before, "a refused resume changed the run directory"


def test_an_unwritable_run_directory_is_one_paragraph(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_hfrun(*TINY, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert f"Cannot write the run directory {blocker / 'run'}" in message and "hydra.run.dir=" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_read_only_directory_is_refused_before_hydra_writes(tmp_path, monkeypatch, capsys):
    """A read-only mount, injected: every write under it fails with EROFS."""
    import errno
    from pathlib import Path

    from hfrun import rundir
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    cfg = OmegaConf.create({"run": {"resume": None},
                            "hydra": {"run": {"dir": str(tmp_path / "ro" / "run")}, "output_subdir": ".hydra"}})
    with pytest.raises(SystemExit) as exited:
        rundir.RunGuard().on_run_start(config=cfg)
    assert exited.value.code == 1
    assert "Read-only file system" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "ro").exists()


def test_run_log_holds_what_the_console_showed(tmp_path):
    run_dir = tmp_path / "run"
    result = run_hfrun(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0
    log = (run_dir / "run.log").read_text()
    for fragment in ("update 10: loss", "update 20: loss", "linreg · adam · seed 0: budget", "final_val_mse",
                     f"run directory: {run_dir}"):
        assert fragment in log, fragment
    assert "\x1b[" not in log and "update 20/20" not in log  # no colour codes, no progress-line redraws


def test_a_sweep_with_a_failing_job_runs_the_rest_and_exits_nonzero(tmp_path):
    result = run_hfrun("-m", "solver=sgd", "solver.lr=-1,0.01", "run.max_updates=5", cwd=tmp_path)
    assert result.returncode == 1
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/*/*/summary.json")}
    assert summaries["0"]["status"] == "error" and "Invalid learning rate: -1" in summaries["0"]["message"]
    assert summaries["1"]["status"] == "budget" and summaries["1"]["updates"] == 5
    message = " ".join(result.stderr.split())
    assert "1 of 2 jobs of the sweep" in message and "solver.lr=-1" in message
    assert "Traceback" not in result.stderr


def test_diverged_run_exits_nonzero_with_message(tmp_path):
    result = run_hfrun("solver=sgd", "solver.lr=1e6", "run.max_updates=50", cwd=tmp_path)
    assert result.returncode == 1
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads(next(tmp_path.glob("outputs/linreg/sgd/*/summary.json")).read_text())
    assert summary["status"] == "diverged"


@pytest.mark.slow
def test_the_first_example_is_solved(tmp_path):
    """`make run`'s command (README, Quick start) ends solved within its two-minute cap."""
    import re
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    command = re.search(r"^run:.*\n\t\$\(BIN\)/hfrun (.*)$", makefile, re.M).group(1).split()
    result = run_hfrun(*command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(next(tmp_path.glob("outputs/*/hf/*/summary.json")).read_text())
    assert summary["status"] == "solved" and summary["final_val_error"] < 0.001


@pytest.mark.parametrize("overrides", [["run.early_stop=abc"], ["run.resume=123"],
                                       ["model=mlp", "model.hidden_sizes=abc"], ["solver=adam", "solver.betas=abc"]])
def test_more_refusals_leave_nothing(tmp_path, overrides):
    result = run_hfrun(*overrides, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and _errors_in(result.stderr) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_refused_start_into_an_existing_run_puts_its_record_back(tmp_path):
    run_dir = tmp_path / "a_run"
    assert run_hfrun(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    refused = run_hfrun("solver.lr=abc", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert refused.returncode == 1
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_resuming_from_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    import torch
    run_dir = tmp_path / "a_run"
    assert run_hfrun(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"] = {key: torch.zeros(3) for key in state["model"]}
    torch.save(state, last)
    hydra_before = sorted(p.name for p in (run_dir / ".hydra").iterdir())
    result = run_hfrun("solver.lr=0.01", "run.max_updates=40", f"run.resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not fit this run" in " ".join(result.stderr.split())
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == hydra_before


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    import subprocess
    from conftest import HFRUN
    import os
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    runs = [subprocess.Popen([str(HFRUN), *TINY, f"seed={seed}", "hydra.job_logging.root.level=WARNING",
                              "run.max_updates=5"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2, 3)]
    assert all(run.wait(timeout=300) == 0 for run in runs)
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/linreg/adam/*/summary.json")]
    assert sorted(s["seed"] for s in summaries) == [1, 2, 3]
