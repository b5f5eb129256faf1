"""The sweep report counts failures and averages minibatches to success over solved runs only."""
from __future__ import annotations

import json

import pytest

from hfrun.errors import HfrunError
from hfrun.report import collect, main, rows


def _summary(directory, task, solver, solved, minibatches, update=None, status=None):
    directory.mkdir(parents=True)
    summary = {"task": task, "solver": solver, "solved": solved, "minibatches": 5000.0, "wall_time_s": 10.0,
               "final_val_error": 0.0 if solved else 0.3, "metric": "error",
               "status": status or ("solved" if solved else "budget")}
    if solved:
        summary["solved_minibatches"] = minibatches
        summary["solved_update"] = update if update is not None else int(minibatches // 100)
    (directory / "summary.json").write_text(json.dumps(summary))


def test_failure_rate_and_mean_over_successes(tmp_path):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 1000.0, update=10)
    _summary(tmp_path / "1", "addition_T30", "hf", True, 3000.0, update=25)
    _summary(tmp_path / "2", "addition_T30", "hf", False, None)
    _summary(tmp_path / "3", "addition_T30", "adam", False, None)
    table = {(r["task"], r["solver"]): r for r in rows(collect([tmp_path]))}
    hf = table["addition_T30", "hf"]
    assert hf["runs"] == 3 and abs(hf["failure_rate"] - 1 / 3) < 1e-12
    assert hf["kminibatches_to_success"] == 2.0
    assert hf["updates_to_success"] == 17.5
    assert table["addition_T30", "adam"]["failure_rate"] == 1.0
    assert table["addition_T30", "adam"]["kminibatches_to_success"] is None
    assert table["addition_T30", "adam"]["updates_to_success"] is None


def test_split_by_a_config_value_read_from_each_run(tmp_path):
    for index, (lr, solved) in enumerate([(0.001, True), (0.01, False), (0.01, False)]):
        run = tmp_path / str(index)
        _summary(run, "addition_T30", "adam", solved, 800.0 if solved else None)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(f"solver:\n  name: adam\n  lr: {lr}\n")
    _summary(tmp_path / "bare", "addition_T30", "adam", False, None)  # a copied summary without its config
    table = {(r["task"], r["solver"]): r for r in rows(collect([tmp_path], ("solver.lr",)))}
    assert table["addition_T30", "adam solver.lr=0.001"]["failure_rate"] == 0.0
    assert table["addition_T30", "adam solver.lr=0.01"]["runs"] == 2
    assert table["addition_T30", "adam solver.lr=?"]["runs"] == 1
    hf_run = tmp_path / "hf"
    _summary(hf_run, "addition_T30", "hf", True, 2000.0)
    (hf_run / ".hydra").mkdir()
    (hf_run / ".hydra" / "config.yaml").write_text("solver:\n  name: hf\n")
    assert ("addition_T30", "hf") in {(r["task"], r["solver"]) for r in rows(collect([tmp_path], ("solver.lr",)))}


def test_only_runs_that_ended_by_their_own_outcome_are_attempts(tmp_path):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 1000.0, update=10)
    _summary(tmp_path / "1", "addition_T30", "hf", False, None)  # budget: a failure to solve
    _summary(tmp_path / "2", "addition_T30", "hf", False, None, status="interrupted")
    _summary(tmp_path / "3", "addition_T30", "hf", False, None, status="error")
    (row,) = rows(collect([tmp_path]))
    assert row["runs"] == 4 and row["failure_rate"] == 0.5
    assert row["statuses"] == "budget 1, error 1, interrupted 1, solved 1"
    assert row["final_error_unsolved"] == [0.3]


def test_runs_without_a_success_criterion_are_reported_too(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(
        {"task": "linreg", "solver": "adam", "status": "budget", "metric": "mse", "final_val_mse": 0.5,
         "minibatches": 2.0, "wall_time_s": 1.0}))
    (row,) = rows(collect([tmp_path]))
    assert row["failure_rate"] is None and row["final_metric"] == "mse 0.5" and row["statuses"] == "budget 1"


@pytest.mark.parametrize("make,fragment", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: root, "No summary.json below"),
    (lambda root: (root / "x").mkdir() or (root / "x" / "summary.json").write_text('{"loss": 1}') and root,
     "is not an hfrun summary: it lacks task, solver, status"),
])
def test_unusable_input_is_an_error_with_exit_status_1(tmp_path, capsys, make, fragment):
    path = make(tmp_path)
    with pytest.raises(HfrunError, match=fragment):
        collect([path])
    with pytest.raises(SystemExit) as exited:
        main([str(path)])
    assert exited.value.code == 1 and fragment.split(":")[0] in " ".join(capsys.readouterr().err.split())
