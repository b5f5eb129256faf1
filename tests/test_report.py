"""The sweep report counts failures and averages minibatches to success over solved runs only."""
from __future__ import annotations

import json

from hfrun.report import collect, rows


def _summary(directory, task, solver, solved, minibatches):
    directory.mkdir(parents=True)
    summary = {"task": task, "solver": solver, "solved": solved, "minibatches": 5000.0, "wall_time_s": 10.0,
               "final_val_error": 0.0 if solved else 0.3}
    if solved:
        summary["solved_minibatches"] = minibatches
    (directory / "summary.json").write_text(json.dumps(summary))


def test_failure_rate_and_mean_over_successes(tmp_path):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 1000.0)
    _summary(tmp_path / "1", "addition_T30", "hf", True, 3000.0)
    _summary(tmp_path / "2", "addition_T30", "hf", False, None)
    _summary(tmp_path / "3", "addition_T30", "adam", False, None)
    table = {(r["task"], r["solver"]): r for r in rows(collect([tmp_path]))}
    hf = table["addition_T30", "hf"]
    assert hf["runs"] == 3 and abs(hf["failure_rate"] - 1 / 3) < 1e-12
    assert hf["kminibatches_to_success"] == 2.0
    assert table["addition_T30", "adam"]["failure_rate"] == 1.0
    assert table["addition_T30", "adam"]["kminibatches_to_success"] is None
