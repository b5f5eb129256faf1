"""The engine's contract: run directory, summary.json, exact resume, TensorBoard tags, early stopping, errors."""
from __future__ import annotations

import errno
import json
import math
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hfrun.checkpoint import OutputError, load_checkpoint, save_checkpoint
from hfrun.engine import Run, check_resume_matches
from hfrun.errors import HfrunError

SUMMARY_KEYS = {"task", "solver", "seed", "status", "updates", "examples_grad", "examples_curv", "wall_time_s",
                "final_train_loss", "best_train_loss", "final_val_loss", "best_val_loss", "final_val_mse",
                "best_val_mse", "best_update", "minibatches"}
FAST_RUN = ["run.max_updates=60", "run.eval_every=10", "run.checkpoint_every=20"]
FAST = ["solver.lr=0.01", *FAST_RUN]


def test_run_directory_and_summary(make_config, tmp_path):
    summary = Run(make_config(*FAST), tmp_path).train()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert SUMMARY_KEYS <= on_disk.keys()
    assert on_disk["status"] == "budget" and on_disk["updates"] == 60
    assert on_disk["examples_grad"] == 60 * 100 and on_disk["examples_curv"] == 0
    assert on_disk["best_val_loss"] <= on_disk["final_val_loss"]
    assert not list(tmp_path.rglob("*.tmp")), "a temporary checkpoint file was left behind"


def _interrupt_at(run: Run, update: int, signals: tuple = (signal.SIGINT,)) -> None:
    """Deliver real signals (a SIGINT by default, as Ctrl-C would) in the middle of the given update."""
    step = run.solver.step

    def step_and_interrupt(stream):
        stats = step(stream)
        if run.progress.update + 1 == update:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return stats

    run.solver.step = step_and_interrupt


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "run_dir", "status")}


HF_SMALL = ["model=mlp", "model.hidden_sizes=[8]", "solver.gradient_batch_size=500", "solver.cg_max_iters=20"]


def _metrics_records(run_dir):
    """metrics.jsonl's records without their timings (wall_s, the solver's time_* figures)."""
    return [{key: value for key, value in json.loads(line).items() if key != "wall_s" and not key.startswith("time_")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("solver,extra", [("sgd", ["solver.lr=0.01"]), ("adam", ["solver.lr=0.01"]),
                                          ("hf", HF_SMALL),
                                          ("sgn", ["model=mlp", "model.hidden_sizes=[8]", "solver.batch_size=200",
                                                   "solver.cg_max_iters=5", "solver.momentum=0.5"]),
                                          ("bdhf", HF_SMALL)])
def test_resume_equals_uninterrupted(make_config, tmp_path, solver, extra):
    overrides = [f"solver={solver}", *FAST_RUN, *extra, "run.early_stop.patience=50"]
    straight = Run(make_config(*overrides), tmp_path / "straight")
    expected = straight.train()

    first = Run(make_config(*overrides), tmp_path / "stopped")
    _interrupt_at(first, 33)
    stopped = first.train()
    assert stopped["status"] == "interrupted" and stopped["updates"] == 33
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["progress"]["update"] == 33

    resumed_run = Run(make_config(*overrides, f"run.resume={tmp_path / 'stopped'}"), tmp_path / "stopped")
    if solver in ("hf", "bdhf"):  # λ and the CG warm start come back from the checkpoint
        assert resumed_run.solver.damping == first.solver.damping
        assert torch.equal(resumed_run.solver.warm_start, first.solver.warm_start)
    resumed = resumed_run.train()
    assert _without_timing(resumed) == _without_timing(expected)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed_run.model.state_dict().items()):
        assert torch.equal(a, b), name
    # metrics.jsonl continues where the checkpoint stood: the same records as the straight run's, but the clock
    assert _metrics_records(tmp_path / "stopped") == _metrics_records(tmp_path / "straight")


def test_hparams_entry_holds_the_settings_and_final_figures(make_config, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    summary = Run(make_config(*FAST), tmp_path).train()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["seed"].number_value == 0 and start.hparams["solver._target_"].string_value.endswith("Adam")
    assert start.hparams["solver.lr"].number_value > 0
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"hparams/final_val_mse", "hparams/solved"} <= {m.name.tag for m in experiment.metric_infos}
    value = [e for e in events.Scalars("hparams/final_val_mse")][0].value
    assert value == pytest.approx(summary["final_val_mse"], rel=1e-6)


def test_tensorboard_tags(make_config, tmp_path):
    Run(make_config(*FAST), tmp_path).train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/mse", "solver/lr", "counts/examples_grad", "counts/examples_curv",
            "time/wall_s"} <= scalars
    assert [e.step for e in events.Scalars("val/loss")] == [10, 20, 30, 40, 50, 60]
    assert "config/text_summary" in events.Tags()["tensors"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_updates: 60" in config_text


def test_early_stopping_keeps_best_and_stops(make_config, tmp_path):
    # lr=0 never improves after the first evaluation: patience 2 stops at the third.
    summary = Run(make_config("solver=sgd", "solver.lr=0.0", "run.max_updates=1000", "run.eval_every=5",
                              "run.early_stop.patience=2"), tmp_path).train()
    assert summary["status"] == "early_stopped" and summary["updates"] == 15
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["progress"]["update"] == 5


def test_nan_loss_is_diverged_and_leaves_no_nan_checkpoint(make_config, tmp_path):
    summary = Run(make_config("solver=sgd", "solver.lr=1e6", "run.max_updates=100", "run.checkpoint_every=1"),
                  tmp_path).train()
    assert summary["status"] == "diverged"
    assert "diverged" in summary["message"]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["progress"]["update"] < 100


def test_hf_with_nan_loss_is_diverged(make_config, tmp_path):
    run = Run(make_config("solver=hf", *HF_SMALL, "run.max_updates=10", "run.checkpoint_every=1"), tmp_path)
    step = run.solver.step

    def poisoned_step(stream):
        if run.progress.update == 3:
            with torch.no_grad():
                next(run.model.parameters()).view(-1)[0] = math.nan
        return step(stream)

    run.solver.step = poisoned_step
    summary = run.train()
    assert summary["status"] == "diverged" and summary["updates"] == 3
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["progress"]["update"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_an_unexpected_error_still_leaves_a_summary(make_config, tmp_path):
    run = Run(make_config(*FAST), tmp_path)

    def broken_step(stream):
        raise RuntimeError("out of memory, say")

    run.solver.step = broken_step
    with pytest.raises(RuntimeError):
        run.train()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "error" and "out of memory" in summary["message"]


@pytest.mark.parametrize("override,fragment", [
    ("seed=abc", "seed must be an integer"),
    ("run.early_stop.min_delta=abc", "run.early_stop.min_delta must be a number"),
    ("run.max_updates=abc", "run.max_updates must be a positive integer"),
    ("run.eval_every=0", "run.eval_every must be a positive integer"),
    ("run.max_seconds=-1", "run.max_seconds must be a positive number or null"),
    ("run.max_minibatches=0", "run.max_minibatches must be a positive number or null"),
    ("run.max_minibatches=true", "run.max_minibatches must be a positive number or null"),
    ("run.device=tpu", "run.device must be auto, cpu or cuda"),
    ("run.dtype=float16", "run.dtype must be one of"),
    ("run.threads=0", "run.threads must be a positive integer or null"),
    ("seed=99999999999999999999999", "seed must be an integer from"),
    ("task.name=foo/../../x", "task.name names the run directory"),
    ("model.input_size=3", "model.input_size=3 was given, but it is filled in from the task"),
    ("solver=hf", "solver.preconditioner_exponent must be finite"),
    ("run.early_stop.metric=accuracy", "run.early_stop.metric='accuracy' is not reported"),
    ("solver.lr=-1", "Could not build the solver"),
])
def test_bad_config_values_name_the_problem(make_config, tmp_path, override, fragment):
    overrides = [override, "solver.preconditioner_exponent=nan"] if override == "solver=hf" else [override]
    with pytest.raises(HfrunError, match=fragment.replace("(", r"\(")):
        Run(make_config(*overrides), tmp_path)


def test_resume_without_checkpoint(make_config, tmp_path):
    with pytest.raises(HfrunError, match="No checkpoint at"):
        Run(make_config(f"run.resume={tmp_path}"), tmp_path)


def test_resume_from_corrupt_checkpoint(make_config, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HfrunError, match="could not be read"):
        Run(make_config(f"run.resume={tmp_path}"), tmp_path)


def test_resume_with_other_solver_is_refused(make_config, tmp_path):
    Run(make_config(*FAST), tmp_path).train()
    with pytest.raises(HfrunError, match="solver._target_='hfrun.solvers.first_order.Adam' in the run"):
        Run(make_config(*FAST, "solver=sgd", f"run.resume={tmp_path}"), tmp_path)
    with pytest.raises(HfrunError, match="run.dtype='float32' in the run, 'float64' now"):
        Run(make_config(*FAST, "run.dtype=float64", f"run.resume={tmp_path}"), tmp_path)


def _config_before(cfg, *removed: str) -> str:
    """The run's config as a checkpoint of an older hfrun holds it: without the options added since."""
    old = OmegaConf.create(OmegaConf.to_yaml(cfg))
    for key in removed:
        group, name = key.rsplit(".", 1)
        OmegaConf.select(old, group).pop(name)
    return OmegaConf.to_yaml(old)


def test_resume_accepts_options_added_since_at_their_default(make_config, tmp_path):
    cfg = make_config("solver=hf", *HF_SMALL)
    saved = _config_before(cfg, "solver.warm_start", "solver.restart_uphill")
    check_resume_matches(saved, cfg, tmp_path)  # the defaults are what the old run did
    with pytest.raises(HfrunError, match=r"solver.warm_start=not set in the run, 'step' now"):
        check_resume_matches(saved, make_config("solver=hf", *HF_SMALL, "solver.warm_start=step"), tmp_path)
    with pytest.raises(HfrunError, match=r"solver.cg_max_iters=20 in the run, 30 now"):
        check_resume_matches(saved, make_config("solver=hf", *HF_SMALL, "solver.cg_max_iters=30"), tmp_path)


def test_resume_compares_solver_hints_only_through_the_solver(make_config, tmp_path):
    cfg = make_config("solver=hf", "task=addition_T30", "run.device=cpu")
    saved = _config_before(cfg, "task.solver_hints.preconditioner")
    with pytest.raises(HfrunError, match=r"solver.preconditioner='martens' in the run, 'none' now") as refused:
        check_resume_matches(saved, cfg, tmp_path)
    assert "solver_hints" not in str(refused.value)
    check_resume_matches(saved, make_config("solver=hf", "task=addition_T30", "solver.preconditioner=martens"),
                         tmp_path)


def test_a_run_from_before_task_protocol_resumes_with_the_definition_it_ran_under(make_config, tmp_path):
    cfg = make_config("solver=hf", "task=addition_T30", "run.device=cpu")
    saved = _config_before(cfg, "task.protocol")
    with pytest.raises(HfrunError, match=r"task.protocol=not set in the run, 'release' now.*it ran as "
                                         r"task.protocol=hfrun, so add that"):
        check_resume_matches(saved, cfg, tmp_path)
    check_resume_matches(saved, make_config("solver=hf", "task=addition_T30", "task.protocol=hfrun"), tmp_path)


def test_a_run_whose_default_changed_since_is_told_the_values_it_ran_with(make_config, tmp_path):
    """A T = 100 run started before its products were compiled by default (solver.jv_method resolved to auto):
    the refusal names the override that continues it with its own settings, and that override resumes it."""
    saved = OmegaConf.to_yaml(make_config("solver=hf", "task=addition_T100", "solver.jv_method=auto"))
    with pytest.raises(HfrunError, match=r"solver.jv_method='auto' in the run, 'compiled' now.*add "
                                         r"solver.jv_method=auto to the command"):
        check_resume_matches(saved, make_config("solver=hf", "task=addition_T100"), tmp_path)
    check_resume_matches(saved, make_config("solver=hf", "task=addition_T100", "solver.jv_method=auto"), tmp_path)
    for other_task in ("task=xor_T100", "task=addition_T200"):  # another task is not a changed default: no such hint
        with pytest.raises(HfrunError) as refused:
            check_resume_matches(saved, make_config("solver=hf", other_task, "solver.jv_method=auto"), tmp_path)
        assert "To continue it with its own settings" not in str(refused.value)


def test_the_resume_hint_gives_overrides_that_hydra_reads_back_as_the_run_values():
    """Strings that Hydra would read as another type are quoted for Hydra, and the whole for the shell."""
    from hfrun.engine import _differing_leaves, _run_values

    def run_values(saved, current, prefix):
        return _run_values(list(_differing_leaves(saved, current, prefix)))

    saved = {"a": "true", "b": "1e-3", "c": "~/data dir", "d": 3, "e": "auto", "f": "auto"}
    current = {"a": True, "b": 0.001, "c": "x", "d": 4, "e": "auto", "f": "traced"}
    assert run_values(saved, current, "solver") == [
        "\"solver.a='true'\"", "\"solver.b='1e-3'\"", "\"solver.c='~/data dir'\"", "solver.d=3", "solver.f=auto"]
    assert run_values({"_target_": "A", "x": 1}, {"_target_": "B", "x": 2}, "task") is None
    assert run_values({"x": 1, "y": 2}, {"x": 2}, "task") is None  # a key the command lacks: no plain override
    assert run_values({"x": 1}, {"x": 2, "y": 2}, "task") is None
    assert run_values({"x": None}, {"x": 2}, "task") == ["task.x=null"]
    assert run_values({"x": "${y}"}, {"x": 2}, "task") is None  # Hydra would resolve it, not keep it
    assert run_values({"a": {"name": {"q": 1}}}, {"a": {"name": {"q": 2}}}, "task") is None


def test_a_bdhf_run_from_before_cut_products_resumes_with_full_products(make_config, tmp_path):
    cfg = make_config("solver=bdhf", *HF_SMALL, "run.device=cpu")
    saved = _config_before(cfg, "solver.cut_products", "solver.block_damping")
    with pytest.raises(HfrunError, match=r"solver.cut_products=not set in the run, True now.*it ran as "
                                         r"solver.cut_products=False"):
        check_resume_matches(saved, cfg, tmp_path)
    check_resume_matches(saved, make_config("solver=bdhf", *HF_SMALL, "solver.cut_products=false"), tmp_path)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"x": torch.ones(3)}, path)

    import hfrun.checkpoint

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hfrun.checkpoint, "open", crash, raising=False)
    with pytest.raises(OutputError, match=f"The disk holding {tmp_path} is full"):
        save_checkpoint({"x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(HfrunError, match="is not an hfrun checkpoint: it lacks model"):
        load_checkpoint(path)


def test_budget_in_seconds(make_config, tmp_path):
    summary = Run(make_config("run.max_updates=100000000", "run.max_seconds=1"), tmp_path).train()
    assert summary["status"] == "budget" and 1 <= summary["wall_time_s"] < 10
    assert math.isfinite(summary["final_val_loss"])


def _cases_per_update(run_dir):
    updates = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [u["examples_grad"] + u["examples_curv"] for u in updates if u["kind"] == "update"]


def test_budget_in_minibatches_counts_the_whole_run_over_resumes(make_config, tmp_path):
    """run.max_minibatches stops a run at the first update whose cases (gradient and curvature together) reach
    that many of the task's published minibatches (1000 cases for linreg); a resume with a larger budget goes on
    to it, and one with the budget already spent makes no update."""
    first = Run(make_config("solver.lr=0.01", "run.max_minibatches=0.45"), tmp_path).train()
    cases = _cases_per_update(tmp_path)
    assert first["status"] == "budget" and first["updates"] == len(cases) < 1000
    assert first["message"] == f"run.max_minibatches=0.45 reached ({cases[-1] / 1000:.1f} minibatches)."
    assert cases[-1] >= 450 > cases[-2] and first["minibatches"] == cases[-1] / 1000
    resumed = Run(make_config("solver.lr=0.01", "run.max_minibatches=0.95", f"run.resume={tmp_path}"),
                  tmp_path).train()
    cases = _cases_per_update(tmp_path)
    assert resumed["status"] == "budget" and cases[-1] >= 950 > cases[-2]
    again = Run(make_config("solver.lr=0.01", "run.max_minibatches=0.95", f"run.resume={tmp_path}"),
                tmp_path).train()
    assert again["status"] == "budget"
    for key in ("updates", "minibatches", "final_val_mse", "best_val_mse"):
        assert again[key] == resumed[key], key


def test_a_resume_whose_time_is_spent_makes_no_update(make_config, tmp_path):
    """Resumed with the run.max_seconds it already spent, a run ends at once with the figures it had."""
    overrides = ("solver.lr=0.01", "run.max_updates=100000000", "run.max_seconds=0.5", "run.eval_every=100000")
    first = Run(make_config(*overrides), tmp_path).train()
    assert first["status"] == "budget" and first["message"].startswith("run.max_seconds=0.5 reached")
    again = Run(make_config(*overrides, f"run.resume={tmp_path}"), tmp_path).train()
    assert again["status"] == "budget" and again["message"].startswith("run.max_seconds=0.5 reached")
    for key in ("updates", "minibatches", "wall_time_s", "final_val_mse", "best_val_mse"):
        assert again[key] == first[key], key


# ---------------------------------------------------------------- how runs end (issue: honest results)

def _strict_json(path):
    """Parse as strict JSON: NaN and Infinity are refused, as many readers refuse them."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_time_capped_run_reports_the_model_it_stopped_at(make_config, tmp_path):
    """A run stopped between evaluations (here by run.max_seconds) evaluates its final model: the summary's
    final figures are those of a re-evaluation of last.pt, not of the last scheduled evaluation."""
    from hfrun.evaluate import evaluate_run
    summary = Run(make_config("solver.lr=0.01", "run.max_updates=100000000", "run.max_seconds=0.5",
                              "run.eval_every=100000"), tmp_path).train()
    assert summary["status"] == "budget" and summary["final_eval_update"] == summary["updates"] > 0
    again = evaluate_run(tmp_path)
    assert again["update"] == summary["updates"]
    assert math.isclose(again["mse"], summary["final_val_mse"], rel_tol=1e-6)


def test_a_success_at_the_final_evaluation_counts(make_config, tmp_path):
    """Stopped by Ctrl-C at update 7, between the evaluations at 5 and 10: a threshold that the model at 7
    meets and the one at 5 does not makes the run solved at its final evaluation."""
    overrides = ["solver.lr=0.05", "run.max_updates=1000", "run.eval_every=5"]
    reference = Run(make_config(*overrides, "run.max_updates=7"), tmp_path / "reference").train()
    at_5, at_7 = reference["best_val_mse"], reference["final_val_mse"]
    assert reference["best_update"] == 5 and at_7 < at_5
    run = Run(make_config(*overrides), tmp_path / "run")
    run.task.success_threshold = (at_5 + at_7) / 2
    _interrupt_at(run, 7)
    summary = run.train()
    assert summary["status"] == "solved" and summary["solved"]
    assert summary["solved_update"] == summary["final_eval_update"] == summary["updates"] == 7
    assert math.isclose(summary["final_val_mse"], at_7, rel_tol=1e-6)


def test_summary_is_strict_json_with_what_was_not_finite(make_config, tmp_path):
    from hfrun.summary import write_summary
    written = write_summary(tmp_path / "s.json", {"loss": math.nan, "best": math.inf, "low": -math.inf, "ok": 1.5})
    on_disk = _strict_json(tmp_path / "s.json")
    assert on_disk == written and on_disk["loss"] is None and on_disk["ok"] == 1.5
    assert on_disk["non_finite"] == {"loss": "nan", "best": "inf", "low": "-inf"}


def test_figures_never_computed_are_null_not_nan(make_config, tmp_path):
    summary = Run(make_config("solver=sgd", "solver.lr=1e6", "run.max_updates=100"), tmp_path).train()
    assert summary["status"] == "diverged"
    on_disk = _strict_json(tmp_path / "summary.json")
    assert on_disk["updates"] < 10  # diverged before any evaluation
    assert on_disk["final_val_loss"] is None and on_disk["best_update"] is None and "non_finite" not in on_disk


def test_full_disk_ends_with_a_message_naming_the_directory(make_config, tmp_path, monkeypatch):
    """ENOSPC from the writer: a one-paragraph OutputError, last.pt left at the last good checkpoint,
    and summary.json never half-written."""
    import hfrun.checkpoint
    run = Run(make_config("solver.lr=0.01", "run.max_updates=100", "run.checkpoint_every=10"), tmp_path)
    real_open, opened = open, []

    def open_on_a_disk_that_fills_up(path, mode="r", *args, **kwargs):
        opened.append(str(path))
        if "last.pt" in str(path) and sum("last.pt" in name for name in opened) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(hfrun.checkpoint, "open", open_on_a_disk_that_fills_up, raising=False)
    with pytest.raises(OutputError, match=f"The disk holding {tmp_path / 'checkpoints'} is full"):
        run.train()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["update"] == 20
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["status"] == "error" and "No space left" in summary["message"]
    assert f"checkpoints/last.pt holds update 20: run.resume={tmp_path} continues" in summary["message"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_full_disk_for_the_summary_leaves_no_empty_file(make_config, tmp_path, monkeypatch):
    import hfrun.checkpoint
    run = Run(make_config("solver.lr=0.01", "run.max_updates=10"), tmp_path)
    real_open = open

    def no_room_for_the_summary(path, mode="r", *args, **kwargs):
        if "summary.json" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(hfrun.checkpoint, "open", no_room_for_the_summary, raising=False)
    with pytest.raises(OutputError, match="summary.json"):
        run.train()
    assert not (tmp_path / "summary.json").exists() and not list(tmp_path.rglob("*.tmp"))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["update"] == 10


KILLED_DURING_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import hfrun.checkpoint
from conftest import compose_config
from hfrun.engine import Run
writes = 0
real_open = open


class HalfThenKilled:
    def __init__(self, handle):
        self.handle = handle
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()
    def write(self, data):
        self.handle.write(bytes(data)[: len(data) // 2])
        self.handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def open_and_die_on_the_fourth_checkpoint(path, mode="r", *args, **kwargs):
    global writes
    handle = real_open(path, mode, *args, **kwargs)
    if str(path).endswith(".pt.tmp"):
        writes += 1
        if writes == 4:  # half of the fourth checkpoint file, then SIGKILL
            return HalfThenKilled(handle)
    return handle


hfrun.checkpoint.open = open_and_die_on_the_fourth_checkpoint
Run(compose_config(*{overrides!r}), {run_dir!r}).train()
"""


def test_sigkill_during_a_checkpoint_write_then_exact_resume(make_config, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    overrides = ["solver=hf", *HF_SMALL, "run.max_updates=30", "run.eval_every=5", "run.checkpoint_every=5"]
    straight = Run(make_config(*overrides), tmp_path / "straight")
    expected = straight.train()
    killed_dir = tmp_path / "killed"
    script = KILLED_DURING_CHECKPOINT.format(tests=str(Path(__file__).parent), overrides=overrides,
                                             run_dir=str(killed_dir))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    # The kill hit the write of best.pt or last.pt; both are either absent or whole, never half-written.
    state = load_checkpoint(killed_dir / "checkpoints" / "last.pt")
    assert 0 < state["progress"]["update"] < 30
    resumed_run = Run(make_config(*overrides, f"run.resume={killed_dir}"), killed_dir)
    resumed = resumed_run.train()
    assert _without_timing(resumed) == _without_timing(expected)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed_run.model.state_dict().items()):
        assert torch.equal(a, b), name
    # the lines the killed process wrote after its checkpoint are dropped on resume
    assert _metrics_records(killed_dir) == _metrics_records(tmp_path / "straight")


def test_a_model_that_does_not_fit_the_task_is_named(make_config, tmp_path):
    with pytest.raises(HfrunError, match=r"hfrun.models.mlp.MLP does not fit the task addition_T30.*\(2, 33, 2\)"):
        Run(make_config("model=mlp", "task=addition_T30", "run.device=cpu"), tmp_path)


@pytest.mark.parametrize("override,fragment", [
    ("solver.lr=abc", "solver.lr must be a number, got 'abc' (str). Example: solver.lr=0.01."),
    ("solver.batch_size=1.5", "solver.batch_size must be an integer, got 1.5 (float)."),
    ("solver.nesterov=maybe", "solver.nesterov must be true or false, got 'maybe' (str). Example: "
                              "solver.nesterov=false."),
    ("model.activation=3", "model.activation must be a string, got 3 (int). Example: model.activation=tanh."),
    ("task.noise_std=abc", "task.noise_std must be a number, got 'abc' (str). Example: task.noise_std=0.1."),
])
def test_an_option_of_the_wrong_type_names_its_key_and_an_example(make_config, tmp_path, override, fragment):
    overrides = ["solver=sgd", override] if override.startswith("solver.nesterov") or "batch" in override else [override]
    with pytest.raises(HfrunError) as refused:
        Run(make_config(*overrides), tmp_path)
    assert fragment in str(refused.value)


def test_linreg_reports_its_distance_to_the_known_optimum(make_config, tmp_path):
    import numpy as np
    summary = Run(make_config("solver.lr=0.01", "run.max_updates=20"), tmp_path).train()
    run_task = Run(make_config(), tmp_path / "again").task
    design = np.hstack([run_task.train_x.numpy(), np.ones((len(run_task.train_x), 1))])
    solution, *_ = np.linalg.lstsq(design, run_task.train_y.numpy(), rcond=None)  # an independent solve
    optimum_loss = 0.5 * float(np.square(design @ solution - run_task.train_y.numpy()).sum(1).mean())
    assert math.isclose(summary["optimum_train_loss"], optimum_loss, rel_tol=1e-6)
    assert summary["excess_train_loss"] > 0.01  # 20 Adam steps are far from the optimum, and it says so


def test_a_stalled_hf_run_ends_with_its_status_not_a_traceback(make_config, tmp_path):
    """`hfrun solver=hf` on linreg with the default settings used to die with an overflow at update 246."""
    summary = Run(make_config("solver=hf", "solver.damping_max=1000", "solver.stall_updates=3",
                              "run.max_updates=300"), tmp_path).train()
    assert summary["status"] == "stalled" and summary["updates"] < 300
    assert "damping_max=1000" in summary["message"] and "stalled" in summary["message"]
    assert summary["final_eval_update"] == summary["updates"]
    assert summary["excess_train_loss"] < 1e-6  # stalled because it is at the optimum
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["update"] == summary["updates"]


def test_run_threads_sets_torch_threads(make_config, tmp_path):
    before = torch.get_num_threads()
    try:
        Run(make_config("run.threads=1"), tmp_path)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("damage", ["stream_position", "negative_update", "text_update", "config_not_text"])
def test_a_damaged_checkpoint_is_refused(make_config, tmp_path, damage):
    Run(make_config(*FAST), tmp_path).train()
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    if damage == "stream_position":
        state["stream"]["position"] = 10**9
    elif damage == "negative_update":
        state["progress"]["update"] = -5
    elif damage == "text_update":
        state["progress"]["update"] = "x"
    else:
        state["config"] = 5
    torch.save(state, path)
    with pytest.raises(HfrunError, match="damaged"):
        Run(make_config(*FAST, f"run.resume={tmp_path}"), tmp_path)


def test_sigterm_stops_at_once_with_a_summary(make_config, tmp_path):
    """A scheduler's time limit, `kill`, or torchrun stopping the processes of a data-parallel run."""
    run = Run(make_config(*FAST), tmp_path)
    _interrupt_at(run, 33, (signal.SIGTERM,))
    previous = signal.getsignal(signal.SIGTERM)
    summary = run.train()
    assert summary["status"] == "interrupted" and summary["updates"] == 32
    assert "Aborted by SIGTERM" in summary["message"] and "run.resume=" in summary["message"]
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler is put back after the run"


def test_a_second_ctrl_c_says_what_was_saved(make_config, tmp_path):
    run = Run(make_config(*FAST), tmp_path)
    _interrupt_at(run, 33, (signal.SIGINT, signal.SIGINT))  # the second aborts at once
    summary = run.train()
    assert summary["status"] == "interrupted" and summary["updates"] == 32
    assert "Aborted by a second Ctrl-C during update 33" in summary["message"]
    assert f"checkpoints/last.pt holds update 20: run.resume={tmp_path} continues" in summary["message"]
    assert "evaluation at update 30" in summary["message"] and summary["final_eval_update"] == 30
