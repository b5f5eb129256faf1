"""HF trains a tanh RNN on the addition problem end to end (Martens & Sutskever 2011)."""
from __future__ import annotations

import json

import pytest

from hfrun.engine import Run

from conftest import run_hfrun

# A tiny instance: minimum length 10, 30 hidden units, smaller batches than the published setting.
TINY_ADDITION = ["solver=hf", "task=addition_T30", "task.T=10", "model.hidden_size=30", "task.eval_sequences=1000",
                 "task.solver_hints.gradient_batch_size=1000", "task.solver_hints.curvature_batch_size=250",
                 "task.solver_hints.backtrack_batch_size=250", "task.solver_hints.cg_max_iters=60",
                 "run.eval_every=1", "run.max_updates=200", "run.max_seconds=120"]


def test_hf_solves_tiny_addition(make_config, tmp_path):
    summary = Run(make_config(*TINY_ADDITION), tmp_path).train()
    assert summary["status"] == "solved", summary
    assert summary["solved"] and summary["final_val_error"] < 0.001
    assert summary["solved_update"] == summary["updates"] <= 100
    assert summary["solved_minibatches"] == (summary["solved_examples_grad"] + summary["solved_examples_curv"]) / 1000
    assert summary["examples_curv"] > summary["examples_grad"] > 0


@pytest.mark.slow
def test_hf_solves_addition_T30_from_the_command_line(tmp_path):
    """The published setting (1000-sequence minibatches, structural damping, 300 CG steps) at T = 30."""
    result = run_hfrun("solver=hf", "task=addition_T30", "run.eval_every=1", "run.max_seconds=1800",
                       "logger.progress=false", f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=2400)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "solved", summary
    assert summary["solved_minibatches"] < 50_000  # M&S 2011 count a run beyond 50,000 minibatches as failed


def test_hf_with_the_release_checks_solves_tiny_addition(make_config, tmp_path):
    """`solver.checks=release`: backtracking on the 2nd chunk of 250, ρ on the curvature chunk, the line search
    on the 3rd (Sutskever's release)."""
    overrides = [o for o in TINY_ADDITION if "backtrack_batch_size" not in o]
    summary = Run(make_config(*overrides, "task.solver_hints.chunk_size=250", "solver.checks=release"),
                  tmp_path).train()
    assert summary["status"] == "solved", summary
    assert summary["solved_update"] <= 100
    updates = [record for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if record["kind"] == "update"]
    judged = [(u["cg_chosen_iter"], u["cg_iters"]) for u in updates]
    assert all(chosen % 10 == 1 or chosen == last for chosen, last in judged), judged
    assert any(chosen != last for chosen, last in judged), judged  # backtracking did choose an earlier one
    stops = {u["cg_stop"] for u in updates}  # why each CG stopped, kept as text in metrics.jsonl
    assert stops <= {"progress", "max_iters", "negative_curvature", "converged"} and "progress" in stops, stops
