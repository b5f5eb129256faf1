"""Summarize runs: `python -m hfrun.report <dir> ...` reads every summary.json below the given
directories and prints, per (task, solver), the number of runs, the failure rate and the mean
thousands of 1000-sequence minibatches to success over the successful runs — the units of
Martens & Sutskever (2011), Figure 3 — and the mean number of solver updates to success. A run
that was not solved within its budget counts as a failure.

`--split-by solver.lr` (repeatable) separates runs by config values, read from each run's
`.hydra/config.yaml` next to its summary.json ("?" where a run has none; runs whose config
lacks the key, such as HF for solver.lr, are not split).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table


def run_settings(summary_path: Path, keys: tuple[str, ...]) -> dict[str, str | None]:
    """Dotted config keys of the run that wrote `summary_path`, as text: "?" without a
    `.hydra/config.yaml` beside it, None where its config has no such key (e.g. solver.lr for HF)."""
    config_path = summary_path.parent / ".hydra" / "config.yaml"
    if not keys or not config_path.is_file():
        return dict.fromkeys(keys, "?")
    config = OmegaConf.load(config_path)
    values = {key: OmegaConf.select(config, key, default=None) for key in keys}
    return {key: None if value is None else str(value) for key, value in values.items()}


def collect(directories: list[Path], split_by: tuple[str, ...] = ()) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for directory in directories:
        for path in sorted(Path(directory).rglob("summary.json")):
            summary = json.loads(path.read_text())
            if "solved" in summary:
                settings = run_settings(path, split_by)
                label = " ".join([summary["solver"], *(f"{k}={v}" for k, v in settings.items() if v is not None)])
                runs[summary["task"], label].append(summary)
    return runs


def rows(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    table = []
    for (task, solver), summaries in sorted(runs.items()):
        solved = [s for s in summaries if s["solved"]]
        table.append({
            "task": task, "solver": solver, "runs": len(summaries),
            "failure_rate": 1 - len(solved) / len(summaries),
            "kminibatches_to_success": statistics.mean(s["solved_minibatches"] / 1000 for s in solved) if solved else None,
            "updates_to_success": statistics.mean(s["solved_update"] for s in solved) if solved else None,
            "budget_kminibatches": max(s["minibatches"] for s in summaries) / 1000,
            "mean_wall_s_to_success": statistics.mean(s["wall_time_s"] for s in solved) if solved else None,
            "final_error_unsolved": [round(s.get("final_val_error", float("nan")), 4) for s in summaries
                                     if not s["solved"]],
        })
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--split-by", action="append", default=[], metavar="KEY",
                        help="a dotted config key, e.g. solver.lr, whose values get separate rows")
    args = parser.parse_args(argv)
    table = Table(title="runs with a success criterion")
    columns = ["task", "solver", "runs", "failure_rate", "kminibatches_to_success", "updates_to_success",
               "budget_kminibatches",
               "mean_wall_s_to_success", "final_error_unsolved"]
    for column in columns:
        table.add_column(column)
    for row in rows(collect(args.directories, tuple(args.split_by))):
        table.add_row(*(f"{row[c]:.3g}" if isinstance(row[c], float) else "–" if row[c] is None else str(row[c])
                        for c in columns))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
