"""Evaluate finished runs again: `python -m hfrun.evaluate <run dir> ... [--checkpoint best] [--set KEY=VALUE]`
loads each run's checkpoint (`last.pt` by default: the model at which it stopped, e.g. when it was
solved), rebuilds its task from the config the checkpoint holds, with the current hfrun and any
`--set` changes (e.g. `--set task.eval_sequences=10000`, or a fresh held-out set of the same task
through `--set task.eval_seed=…`), and prints the held-out loss and metric next to the ones in the run's
summary.json. Use it to check a success on fresh sequences, or a run made under an older held-out
protocol under the current one. `--set seed=…` is refused: the seed also fixes the training problem
(linreg's weights and training set), which a re-evaluation must not change.

Exit status 1, after evaluating the others, when a directory does not exist or has no such checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from rich.console import Console
from rich.table import Table

from hfrun.checkpoint import load_checkpoint
from hfrun.engine import DTYPES, build_model, build_task, resolve_device, validate_run_config
from hfrun.errors import HfrunError
from hfrun.tasks.base import Task


def load_run(run_dir: Path, checkpoint: str = "last", overrides: tuple[str, ...] = (),
             device: str = "auto") -> tuple[dict, Task, nn.Module]:
    """`run_dir`'s checkpoint state, its task rebuilt with `overrides` (held-out settings only), and its model
    with the checkpoint's weights, in eval mode."""
    malformed = [override for override in overrides if "=" not in override or override.startswith(("+", "~"))]
    if malformed:
        raise HfrunError(f"--set takes KEY=VALUE pairs of keys the run's config has, got {', '.join(malformed)}. "
                         "Example: --set task.eval_sequences=10000.")
    if any(override.split("=", 1)[0].strip() == "seed" for override in overrides):
        raise HfrunError("--set seed=... would change the training problem itself (for linreg its weights and "
                         "training set), not only the held-out set. Use --set task.eval_seed=N for a fresh "
                         "held-out set of the same task.")
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    saved = OmegaConf.create(state["config"])
    unknown = [o for o in overrides if OmegaConf.select(saved, o.split("=", 1)[0].strip(), default=KeyError) is KeyError]
    if unknown:
        raise HfrunError(f"--set {', '.join(unknown)}: the run's config has no such key (a config group such as "
                         "task= cannot be swapped here). Change values of the run's own task, e.g. "
                         "--set task.eval_sequences=10000.")
    try:
        cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides)))
        validate_run_config(cfg)
        torch_device, dtype = resolve_device(device), DTYPES[cfg.run.dtype]
        task = build_task(cfg, torch_device, dtype)
        model = build_model(cfg, task, torch_device, dtype)
        model.load_state_dict(state["model"])
    except HfrunError:
        raise
    except Exception as error:  # e.g. --set model.hidden_sizes=[5]: the checkpoint no longer fits the model
        raise HfrunError(f"The run could not be rebuilt with --set {' '.join(overrides)} "
                         f"({type(error).__name__}: {error}). Change only held-out settings, such as "
                         "task.eval_sequences or task.eval_seed.") from None
    model.eval()
    return state, task, model


def evaluate_run(run_dir: Path, checkpoint: str = "last", overrides: tuple[str, ...] = (),
                 device: str = "auto") -> dict:
    """The held-out metrics of `run_dir`'s checkpoint on its task, rebuilt with `overrides`."""
    state, task, model = load_run(run_dir, checkpoint, overrides, device)
    with torch.no_grad():
        metrics = task.evaluate(model)
    return {"update": state["progress"]["update"], **metrics}


def _shown(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change the run's config before rebuilding its task (repeatable)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    console = Console(width=200)
    table = Table(title=f"held-out evaluation of checkpoints/{args.checkpoint}.pt")
    for column in ("run", "task", "solver", "status", "update", "metric in summary", "metric now", "loss now"):
        table.add_column(column)
    problems = []
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            problems.append(f"{run_dir} does not exist or is not a directory")
            continue
        if not (run_dir / "checkpoints" / f"{args.checkpoint}.pt").is_file():
            problems.append(f"{run_dir} has no checkpoints/{args.checkpoint}.pt (not an hfrun run directory, or "
                            "a run stopped before its first checkpoint)")
            continue
        try:
            metrics = evaluate_run(run_dir, args.checkpoint, tuple(args.overrides), args.device)
        except HfrunError as error:
            problems.append(f"{run_dir}: {error}")
            continue
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        metric = summary.get("metric", "loss")
        table.add_row(str(run_dir), summary.get("task", "?"), summary.get("solver", "?"), summary.get("status", "?"),
                      str(metrics["update"]), _shown(summary.get(f"final_val_{metric}")),
                      f"{metrics.get(metric, metrics['loss']):.4g}", f"{metrics['loss']:.4g}")
    if table.row_count:
        console.print(table)
    if problems:
        errors = Console(stderr=True, width=200)
        for problem in problems:
            errors.print(f"[bold red]hfrun.evaluate:[/] {problem}")
        sys.exit(1)


if __name__ == "__main__":
    main()
