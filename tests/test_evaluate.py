"""`python -m hfrun.evaluate`: a finished run's checkpoint evaluated again on its (possibly changed) held-out set."""
from __future__ import annotations

import math

import pytest

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
    other_seed = evaluate_run(tmp_path, overrides=("seed=7", "task.eval_sequences=3000"))
    assert 0 <= other_seed["error"] <= 1 and other_seed["loss"] != same["loss"]
    with pytest.raises(HfrunError, match="eval_sequences must be at least 1000"):
        evaluate_run(tmp_path, overrides=("task.eval_sequences=10",))


def test_command_line_table_and_skipped_directories(make_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Run(make_config(*ADAM_LINREG), run_dir).train()
    main([str(run_dir), str(tmp_path / "empty"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "skipped" in printed and "empty" in printed
    assert "linreg" in printed and "adam" in printed
