"""`python -m hfrun.evaluate`: a finished run's checkpoint evaluated again on its (possibly changed) held-out set."""
from __future__ import annotations

import math
import re

import pytest
import torch

from hfrun.engine import Run
from hfrun.errors import HfrunError
from hfrun.evaluate import evaluate_run, main

ADAM_LINREG = ["solver=adam", "solver.lr=0.01", "run.max_updates=30", "run.eval_every=10", "run.checkpoint_every=10"]
ONE_SGD_UPDATE_ON_ADDITION = ["solver=sgd", "task=addition_T30", "task.T=10", "model.hidden_size=8",
                              "run.max_updates=1", "run.device=cpu"]


def test_reproduces_the_runs_own_held_out_figures(make_config, tmp_path):
    summary = Run(make_config(*ADAM_LINREG), tmp_path).train()
    again = evaluate_run(tmp_path)
    assert again["update"] == 30
    assert math.isclose(again["loss"], summary["final_val_loss"], rel_tol=1e-6)
    best = evaluate_run(tmp_path, checkpoint="best")
    assert math.isclose(best["loss"], summary["best_val_loss"], rel_tol=1e-6)


def test_held_out_set_can_be_changed_and_bad_values_are_refused(make_config, tmp_path):
    summary = Run(make_config(*ONE_SGD_UPDATE_ON_ADDITION), tmp_path).train()
    same = evaluate_run(tmp_path)
    assert math.isclose(same["error"], summary["final_val_error"], abs_tol=1e-9)
    other_seed = evaluate_run(tmp_path, overrides=("task.eval_seed=7", "task.eval_sequences=3000"))
    assert 0 <= other_seed["error"] <= 1 and other_seed["loss"] != same["loss"]
    with pytest.raises(HfrunError, match="eval_sequences must be at least 1000"):
        evaluate_run(tmp_path, overrides=("task.eval_sequences=10",))


def test_command_line_table_and_directories_it_cannot_use(make_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Run(make_config(*ADAM_LINREG), run_dir).train()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exited:
        main([str(run_dir), str(tmp_path / "empty"), str(tmp_path / "missing"), "--device", "cpu"])
    assert exited.value.code == 1
    printed = capsys.readouterr()
    assert "linreg" in printed.out and "adam" in printed.out  # the usable run is still evaluated
    errors = " ".join(printed.err.split())
    assert "empty has no checkpoints/last.pt" in errors and "missing does not exist" in errors


def test_a_missing_path_alone_exits_nonzero(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "nowhere")])
    assert exited.value.code == 1 and "does not exist" in capsys.readouterr().err


def test_a_fresh_held_out_set_keeps_the_training_problem(make_config, tmp_path):
    """On linreg the seed fixes w*, b* and the training set: task.eval_seed changes only the held-out set."""
    from hfrun.engine import build_task
    task = build_task(make_config(), "cpu", torch.float64)
    fresh = build_task(make_config("task.eval_seed=5"), "cpu", torch.float64)
    assert torch.equal(task.true_weight, fresh.true_weight) and torch.equal(task.train_x, fresh.train_x)
    assert not torch.equal(task.eval_x, fresh.eval_x)
    # the fresh held-out set is drawn from the same problem: the true parameters' mse is the noise floor σ²
    residual = fresh.eval_x @ fresh.true_weight.T + fresh.true_bias - fresh.eval_y
    assert abs(float(residual.square().mean()) - 0.1 ** 2) < 0.002
    Run(make_config(*ADAM_LINREG), tmp_path).train()
    with pytest.raises(HfrunError, match="task.eval_seed"):
        evaluate_run(tmp_path, overrides=("seed=3",))


@pytest.mark.parametrize("override,fragment", [
    ("foo", "--set takes KEY=VALUE pairs"), ("+seed=3", "--set takes KEY=VALUE pairs"),
    ("task.nope=3", "the run's config has no such key"), ("run.dtype=float16", "run.dtype must be one of"),
    ("model.hidden_sizes=[5]", "The run could not be rebuilt"),
])
def test_bad_set_values_are_refused_with_a_reason(make_config, tmp_path, override, fragment):
    Run(make_config(*ADAM_LINREG), tmp_path).train()
    with pytest.raises(HfrunError, match=re.escape(fragment)):
        evaluate_run(tmp_path, overrides=(override,))


def test_the_command_reads_a_run_whose_config_uses_hfrun_resolvers(make_config, tmp_path):
    """5-bit memorization's solver hints depend on task.protocol through hfrun's own resolver: a fresh process
    running `python -m hfrun.evaluate` must know it, as the run did."""
    import subprocess
    import sys

    Run(make_config("solver=sgd", "task=memorization5_T30", "task.T=12", "model.hidden_size=8", "run.max_updates=1",
                    "run.device=cpu"), tmp_path).train()
    result = subprocess.run([sys.executable, "-m", "hfrun.evaluate", str(tmp_path), "--set", "task.eval_seed=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "memorization5_T12" in result.stdout
