"""Summarize runs: `python -m hfrun.report <dir> ...` reads every summary.json below the given
directories and prints, per (task, solver), the number of runs, the failure rate and the mean
thousands of 1000-sequence minibatches to success over the successful runs — the units of
Martens & Sutskever (2011), Figure 3. A run that was not solved counts as a failure.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table


def collect(directories: list[Path]) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for directory in directories:
        for path in sorted(Path(directory).rglob("summary.json")):
            summary = json.loads(path.read_text())
            if "solved" in summary:
                runs[summary["task"], summary["solver"]].append(summary)
    return runs


def rows(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    table = []
    for (task, solver), summaries in sorted(runs.items()):
        solved = [s for s in summaries if s["solved"]]
        table.append({
            "task": task, "solver": solver, "runs": len(summaries),
            "failure_rate": 1 - len(solved) / len(summaries),
            "kminibatches_to_success": statistics.mean(s["solved_minibatches"] / 1000 for s in solved) if solved else None,
            "budget_kminibatches": max(s["minibatches"] for s in summaries) / 1000,
            "mean_wall_s_to_success": statistics.mean(s["wall_time_s"] for s in solved) if solved else None,
            "final_error_unsolved": [round(s.get("final_val_error", float("nan")), 4) for s in summaries
                                     if not s["solved"]],
        })
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directories", nargs="+", type=Path)
    args = parser.parse_args(argv)
    table = Table(title="runs with a success criterion")
    columns = ["task", "solver", "runs", "failure_rate", "kminibatches_to_success", "budget_kminibatches",
               "mean_wall_s_to_success", "final_error_unsolved"]
    for column in columns:
        table.add_column(column)
    for row in rows(collect(args.directories)):
        table.add_row(*(f"{row[c]:.3g}" if isinstance(row[c], float) else "–" if row[c] is None else str(row[c])
                        for c in columns))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
