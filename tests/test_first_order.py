"""SGD and Adam, run by the engine, reach the known least-squares optimum of the linreg task."""
from __future__ import annotations

import pytest
import torch

from hfrun.engine import Run


@pytest.mark.parametrize("solver,overrides", [
    ("sgd", ["solver.lr=0.05", "solver.momentum=0.0"]),
    ("adam", ["solver.lr=0.01"]),
])
def test_converges_to_least_squares_optimum(make_config, tmp_path, solver, overrides):
    cfg = make_config(f"solver={solver}", *overrides, "run.max_updates=1500", "run.eval_every=500",
                      "run.dtype=float64", "task.solver_hints.batch_size=200")
    run = Run(cfg, tmp_path)
    summary = run.train()
    weight_opt, bias_opt = run.task.optimum()
    layer = run.model.layers[-1]
    weight_error = torch.linalg.norm(layer.weight.detach() - weight_opt) / torch.linalg.norm(weight_opt)
    bias_error = (layer.bias.detach() - bias_opt).abs().max()
    assert weight_error < 5e-3, weight_error
    assert bias_error < 5e-3, bias_error
    # Held-out MSE at the noise floor σ² = 0.01 (plus the estimation error of 11 parameters from 2000 cases).
    assert summary["final_val_mse"] < 0.0105 * 1.1
    assert summary["status"] == "budget"
