"""The live progress line counts toward the budget that binds first and shows an ETA."""
from __future__ import annotations

from hfrun.logging import RunLogger


def _logger(tmp_path, **kwargs):
    return RunLogger(tmp_path, "", tensorboard=False, progress=False, metric_name="error", **kwargs)


def test_a_time_budget_drives_the_bar_and_the_eta(tmp_path):
    logger = _logger(tmp_path, max_updates=1_000_000, start_update=0, max_seconds=100)
    assert logger._budget_spent(10, 50.0) == 0.5  # 10 of a million updates, but half the seconds
    assert "or 100 s" in logger._where(10)
    logger.started -= 50.0  # 50 s into this session, 10 updates done
    assert logger._eta(10, 50.0) == "0:00:50"  # the time budget binds: 50 s left, not ~58 days


def test_an_update_budget_eta_follows_the_pace(tmp_path):
    logger = _logger(tmp_path, max_updates=100, start_update=20, start_seconds=30.0)
    logger.started -= 40.0  # 20 updates of this session took 40 s
    assert logger._eta(40, 70.0) == "0:02:00"  # 60 updates left at 2 s each
    assert logger._budget_spent(40, 70.0) == 0.4 and logger._where(40) == "update 40/100"


def test_a_minibatch_budget_drives_the_bar_and_the_eta(tmp_path):
    logger = _logger(tmp_path, max_updates=1_000_000, start_update=10, max_minibatches=50, minibatch_size=1000,
                     start_counters={"examples_grad": 8000, "examples_curv": 2000})  # 10 minibatches so far
    assert "or 10/50 minibatches" in logger._where(10) and logger._budget_spent(10, 5.0) == 0.2
    logger.counters = {"examples_grad": 16000, "examples_curv": 4000}  # 10 more in this session's 10 updates
    logger.started -= 100.0  # ... which took 100 s
    assert logger._budget_spent(20, 105.0) == 0.4
    assert logger._eta(20, 105.0) == "0:05:00"  # 30 minibatches left at 10 s each


def test_metrics_file_is_strict_json_with_non_finite_figures_named(tmp_path):
    import json
    import math

    from hfrun.logging import MetricsFile

    metrics = MetricsFile(tmp_path / "metrics.jsonl", start_update=0)
    metrics.write({"kind": "update", "update": 1, "loss": 0.5, "rho": math.nan})
    metrics.write({"kind": "eval", "update": 1, "val": {"error": math.inf, "loss": 0.25}})
    metrics.close()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    first, second = (json.loads(line, parse_constant=refuse) for line in
                     (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert first["rho"] is None and first["non_finite"] == {"rho": "nan"} and first["loss"] == 0.5
    assert second["val"] == {"error": None, "loss": 0.25} and second["non_finite"] == {"val.error": "inf"}
