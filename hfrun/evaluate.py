"""Evaluate finished runs again: `python -m hfrun.evaluate <run dir> ... [--checkpoint best] [--set KEY=VALUE]`
loads each run's checkpoint (`last.pt` by default: the model at which it stopped, e.g. when it was
solved), rebuilds its task from the config the checkpoint holds, with the current hfrun and any
`--set` changes (e.g. `--set task.eval_sequences=10000`, or a held-out set drawn with another seed
through `--set seed=…`), and prints the held-out loss and metric next to the ones in the run's
summary.json. Use it to check a success on fresh sequences, or a run made under an older held-out
protocol under the current one. Directories without a checkpoint are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from hfrun.checkpoint import load_checkpoint
from hfrun.engine import DTYPES, build_model, build_task, resolve_device
from hfrun.errors import HfrunError


def evaluate_run(run_dir: Path, checkpoint: str = "last", overrides: tuple[str, ...] = (),
                 device: str = "auto") -> dict:
    """The held-out metrics of `run_dir`'s checkpoint on its task, rebuilt with `overrides`."""
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    cfg = OmegaConf.merge(OmegaConf.create(state["config"]), OmegaConf.from_dotlist(list(overrides)))
    torch_device, dtype = resolve_device(device), DTYPES[cfg.run.dtype]
    task = build_task(cfg, torch_device, dtype)
    model = build_model(cfg, task, torch_device, dtype)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model)
    return {"update": state["progress"]["update"], **metrics}


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
    for run_dir in args.run_dirs:
        if not (run_dir / "checkpoints" / f"{args.checkpoint}.pt").is_file():
            console.print(f"[yellow]skipped {run_dir}: no checkpoints/{args.checkpoint}.pt[/]")
            continue
        try:
            metrics = evaluate_run(run_dir, args.checkpoint, tuple(args.overrides), args.device)
        except HfrunError as error:
            raise SystemExit(f"hfrun.evaluate: {run_dir}: {error}") from None
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        metric = summary.get("metric", "loss")
        table.add_row(str(run_dir), summary.get("task", "?"), summary.get("solver", "?"), summary.get("status", "?"),
                      str(metrics["update"]), f"{summary.get(f'final_val_{metric}', float('nan')):.4g}",
                      f"{metrics.get(metric, metrics['loss']):.4g}", f"{metrics['loss']:.4g}")
    console.print(table)


if __name__ == "__main__":
    main()
