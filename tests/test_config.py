"""Every option of every config group composes and names a class that exists."""
from __future__ import annotations

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from hfrun.config import CONFIG_DIR

from conftest import compose_config

GROUPS = ("task", "model", "solver", "run", "logger")


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    if group == "task" and OmegaConf.is_missing(cfg.task, "T"):  # a task's base file: any T by override
        cfg = compose_config(f"{group}={option}", "task.T=40")
        assert cfg.task.name == f"{option}_T40"
    assert OmegaConf.select(cfg, group) is not None
    if "_target_" in cfg[group]:
        assert get_class(cfg[group]._target_)
    # Everything but the values the engine fills in from the task resolves.
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["seed"] == 0


def test_defaults_compose_to_linreg_with_adam():
    cfg = compose_config()
    assert (cfg.task.name, cfg.solver.name) == ("linreg", "adam")
    assert cfg.model._target_ == "hfrun.models.mlp.MLP" and list(cfg.model.hidden_sizes) == []
    assert OmegaConf.is_missing(cfg.model, "input_size")


def test_solver_batch_size_follows_task_hint_and_override_wins():
    assert compose_config("solver=sgd").solver.batch_size == 100
    assert compose_config("solver=sgd", "task.solver_hints.batch_size=32").solver.batch_size == 32
    assert compose_config("solver=sgd", "solver.batch_size=7").solver.batch_size == 7


def test_pathological_products_are_compiled_only_where_a_run_meets_one_long_shape():
    """Release definitions at T >= 100: one batch shape per run, long runs: compiled products. Shorter tasks, and
    hfrun's definitions (a new length per batch, each a compilation), keep auto; the command line still wins."""
    def method(*overrides):
        return compose_config("solver=hf", *overrides).solver.jv_method
    assert method("task=addition_T100") == method("task=xor_T200") == method("task=addition", "task.T=150") == "compiled"
    assert method("task=addition_T50") == method("task=addition_T100", "task.protocol=hfrun") == "auto"
    assert method("task=mnist") == "auto"
    assert method("task=addition_T200", "solver.jv_method=traced") == "traced"
    assert compose_config("solver=bdhf", "task=permutation_T100").solver.jv_method == "compiled"
    assert compose_config("solver=sgn", "task=permutation_T100").solver.jv_method == "compiled"


def test_command_line_model_beats_task_default():
    assert list(compose_config("model=mlp").model.hidden_sizes) == [256, 256]
