"""Summarize runs: `python -m hfrun.report <dir> ...` reads every summary.json below the given
directories and prints, per (task, solver), the number of runs and how they ended (status), and for
tasks with a success criterion the failure rate and the mean thousands of 1000-sequence minibatches to
success over the successful runs — the units of Martens & Sutskever (2011), Figure 3 — and the mean
number of solver updates to success.

What counts as an attempt: a run that ended by its own outcome (solved, budget, early_stopped, stalled,
diverged). Of these, every one that did not solve is a failure. Runs that were interrupted or ended in
an error (a crash, a full disk, a refused sweep job) did not finish their attempt: they are shown in the
status column but count neither as failures nor as successes.

`--split-by solver.lr` (repeatable) separates runs by config values, read from each run's
`.hydra/config.yaml` next to its summary.json ("?" where a run has none; runs whose config
lacks the key, such as HF for solver.lr, are not split).

Exit status 1, with the reason, when a directory does not exist, holds no summary.json, or holds a
summary.json that is not an hfrun summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from hfrun.errors import HfrunError
from hfrun.summary import FINISHED

REQUIRED = ("task", "solver", "status")
COLUMNS = ["task", "solver", "runs", "statuses", "failure_rate", "kminibatches_to_success", "updates_to_success",
           "budget_kminibatches", "mean_wall_s_to_success", "final_metric", "final_error_unsolved"]


def run_settings(summary_path: Path, keys: tuple[str, ...]) -> dict[str, str | None]:
    """Dotted config keys of the run that wrote `summary_path`, as text: "?" without a
    `.hydra/config.yaml` beside it, None where its config has no such key (e.g. solver.lr for HF)."""
    config_path = summary_path.parent / ".hydra" / "config.yaml"
    if not keys or not config_path.is_file():
        return dict.fromkeys(keys, "?")
    try:
        config = OmegaConf.load(config_path)
    except Exception as error:
        raise HfrunError(f"{config_path} could not be read ({type(error).__name__}: {error}); --split-by needs "
                         "it. Repair or remove it, or report without --split-by.") from None
    values = {key: OmegaConf.select(config, key, default=None) for key in keys}
    return {key: None if value is None else str(value) for key, value in values.items()}


def _read(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HfrunError(f"{path} could not be read as JSON ({error}). Remove or repair it and run the "
                         "report again.") from None
    missing = [key for key in REQUIRED if key not in summary] if isinstance(summary, dict) else list(REQUIRED)
    if missing:
        raise HfrunError(f"{path} is not an hfrun summary: it lacks {', '.join(missing)}. Point the report "
                         "at hfrun run or sweep directories (outputs/...).")
    return summary


def collect(directories: list[Path], split_by: tuple[str, ...] = ()) -> dict[tuple[str, str], list[dict]]:
    """Summaries below `directories`, grouped by (task, solver label); HfrunError when there are none."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for directory in map(Path, directories):
        if not directory.exists():
            raise HfrunError(f"{directory} does not exist. Give run or sweep directories, e.g. "
                             "outputs/multirun/<date_time> or outputs/addition_T30/hf.")
        paths = [directory] if directory.is_file() else sorted(directory.rglob("summary.json"))
        if not paths:
            raise HfrunError(f"No summary.json below {directory}: it holds no finished hfrun run (a run "
                             "writes summary.json when it ends).")
        for path in paths:
            summary = _read(path)
            settings = run_settings(path, split_by)
            label = " ".join([str(summary["solver"]), *(f"{k}={v}" for k, v in settings.items() if v is not None)])
            runs[str(summary["task"]), label].append(summary)
    return runs


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def rows(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    table = []
    for (task, solver), summaries in sorted(runs.items()):
        statuses = Counter(s["status"] for s in summaries)
        finished = [s for s in summaries if s["status"] in FINISHED]
        criterion = any("solved" in s for s in summaries)
        solved = [s for s in finished if s.get("solved") and s.get("solved_minibatches") is not None
                  and s.get("solved_update") is not None]
        metric = next((s["metric"] for s in summaries if s.get("metric")), None)
        finals = [s.get(f"final_val_{metric}") for s in finished]
        table.append({
            "task": task, "solver": solver, "runs": len(summaries),
            "statuses": ", ".join(f"{status} {count}" for status, count in sorted(statuses.items())),
            "failure_rate": 1 - len(solved) / len(finished) if criterion and finished else None,
            "kminibatches_to_success": _mean([s["solved_minibatches"] / 1000 for s in solved]),
            "updates_to_success": _mean([s["solved_update"] for s in solved]),
            "budget_kminibatches": max((s.get("minibatches") or 0 for s in summaries), default=0) / 1000,
            "mean_wall_s_to_success": _mean([s["wall_time_s"] for s in solved]),
            "final_metric": (f"{metric} {_mean([v for v in finals if v is not None]):.4g}"
                             if metric and any(v is not None for v in finals) else None),
            "final_error_unsolved": [round(s["final_val_error"], 4) for s in finished
                                     if criterion and not s.get("solved") and s.get("final_val_error") is not None],
        })
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--split-by", action="append", default=[], metavar="KEY",
                        help="a dotted config key, e.g. solver.lr, whose values get separate rows")
    args = parser.parse_args(argv)
    try:
        table_rows = rows(collect(args.directories, tuple(args.split_by)))
    except HfrunError as error:
        Console(stderr=True).print(f"[bold red]hfrun.report:[/] {error}")
        sys.exit(1)
    table = Table(title="runs")
    for column in COLUMNS:
        table.add_column(column)
    for row in table_rows:
        table.add_row(*(f"{row[c]:.3g}" if isinstance(row[c], float) else "–" if row[c] is None else str(row[c])
                        for c in COLUMNS))
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
