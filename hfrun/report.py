"""Summarize runs: `hfrun-report <dir> ...` (or `python -m hfrun.report`) reads every summary.json below the given
directories and prints, per (task, solver), the number of runs and how they ended (status), and for
tasks with a success criterion the failure rate and the mean thousands of 1000-sequence minibatches to
success over the successful runs — the units of Martens & Sutskever (2011), Figure 3 — and the mean
number of solver updates to success, each with its standard deviation over the runs (`_sd`); the mean
final and best held-out metric; and the time to success.

What counts as an attempt: a run that ended by its own outcome (solved, budget, early_stopped, stalled,
diverged). Of these, every one that did not solve is a failure. Runs that were interrupted or ended in
an error (a crash, a full disk, a refused sweep job) did not finish their attempt: they are shown in the
status column but count neither as failures nor as successes.

`--split-by solver.lr` (repeatable) separates runs by config values, read from each run's
`.hydra/config.yaml` next to its summary.json ("?" where a run has none; runs whose config
lacks the key, such as HF for solver.lr, are not split). Runs of the pathological tasks are always split by
the task's definition (summary.json's task_protocol, else the run's config): those not under the
release's (the default) are labelled `task.protocol=hfrun`, as are runs from before the option, which all
used hfrun's.

`--format markdown|csv` prints the table for a README or a spreadsheet instead of the console table.

`--layout` picks the table:
  - `runs` (default): the columns above;
  - `ms2011`: Martens & Sutskever (2011) Figure 3's layout for the pathological tasks, hfrun's failure rate
    and mean k-minibatches to success next to the paper's (hfrun/published.py);
  - `sgn`: Gargiani et al. (2020)'s layout for data-set tasks, the mean held-out metric at given wall-clock
    seconds (`--at-seconds`) and epochs (`--at-epochs`), from each run's metrics.jsonl: the last evaluation
    made by then, averaged over the runs that had made one ("–" where none had).

`--plot FILE.png` draws, from each run's metrics.jsonl (hfrun/logging.py), the training loss and the
held-out metric against wall-clock seconds, examples processed and updates: one line per (task, solver
and split keys), the mean over its runs (seeds) with a band from their minimum to their maximum, each run
interpolated onto a common grid (at each point, the runs that reach it); a log scale where the values are
positive and span more than two decades. Runs without metrics.jsonl (written since this command existed) are left out, and named.

Exit status 1, with the reason, when a directory does not exist, holds no summary.json, or holds a
summary.json that is not an hfrun summary.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from hfrun.errors import HfrunError
from hfrun.summary import FINISHED

REQUIRED = ("task", "solver", "status")
MS2011_COLUMNS = ["task", "solver", "runs", "failure_rate", "ms2011_failure_rate", "kminibatches_to_success",
                  "ms2011_kminibatches", "updates_to_success"]
COLUMNS = ["task", "solver", "runs", "statuses", "failure_rate", "kminibatches_to_success", "kminibatches_sd",
           "updates_to_success", "updates_sd", "budget_kminibatches", "mean_wall_s_to_success", "final_metric",
           "best_metric", "final_error_unsolved"]


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


def task_protocol(summary: dict, summary_path: Path) -> str | None:
    """Which definition a pathological task's run used: the summary's task_protocol, else task.protocol in
    the run's .hydra/config.yaml, else hfrun's (runs from before the option existed). None for other tasks."""
    from hfrun.published import MS2011_FIGURE3

    if summary.get("task_protocol"):
        return str(summary["task_protocol"])
    if str(summary["task"]).rpartition("_T")[0] not in MS2011_FIGURE3:
        return None
    configured = run_settings(summary_path, ("task.protocol",))["task.protocol"]
    return configured if configured not in (None, "?") else "hfrun"


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
            summary["_path"] = str(path)
            settings = run_settings(path, split_by)
            protocol = task_protocol(summary, path)
            if "task.protocol" in settings and settings["task.protocol"] in (None, "?"):
                settings["task.protocol"] = protocol  # a run from before the option: hfrun's definition
            label = " ".join([str(summary["solver"]), *(f"{k}={v}" for k, v in settings.items() if v is not None),
                              *([f"task.protocol={protocol}"] if protocol not in (None, "release")
                                and "task.protocol" not in settings else [])])
            runs[str(summary["task"]), label].append(summary)
    return runs


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _spread(values: list[float]) -> float | None:
    """The sample standard deviation over the runs (None for fewer than two)."""
    return statistics.stdev(values) if len(values) > 1 else None


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
            "kminibatches_sd": _spread([s["solved_minibatches"] / 1000 for s in solved]),
            "updates_sd": _spread([s["solved_update"] for s in solved]),
            "updates_to_success": _mean([s["solved_update"] for s in solved]),
            "budget_kminibatches": max((s.get("minibatches") or 0 for s in summaries), default=0) / 1000,
            "mean_wall_s_to_success": _mean([s["wall_time_s"] for s in solved]),
            "best_metric": (f"{metric} {_mean(bests):.4g}" if metric and (bests := [
                s.get(f"best_val_{metric}") for s in finished if s.get(f"best_val_{metric}") is not None]) else None),
            "final_metric": (f"{metric} {_mean([v for v in finals if v is not None]):.4g}"
                             if metric and any(v is not None for v in finals) else None),
            "final_error_unsolved": [round(s["final_val_error"], 4) for s in finished
                                     if criterion and not s.get("solved") and s.get("final_val_error") is not None],
        })
    return table


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "–" if value is None else str(value)


def ms2011_rows(table_rows: list[dict]) -> list[dict]:
    """The rows of pathological tasks, with M&S Figure 3's entries beside hfrun's."""
    from hfrun.published import ms2011_entry

    out = []
    for row in table_rows:
        entry = ms2011_entry(row["task"])
        if entry is None:
            continue
        out.append({"task": row["task"], "solver": row["solver"], "runs": row["runs"],
                    "failure_rate": row["failure_rate"], "ms2011_failure_rate": float(entry[0]),
                    "kminibatches_to_success": row["kminibatches_to_success"],
                    "ms2011_kminibatches": entry[1], "updates_to_success": row["updates_to_success"]})
    return out


def metric_at(records: list[dict], metric: str, *, seconds: float | None = None, epochs: float | None = None,
              cases_per_epoch: float | None = None) -> float | None:
    """The held-out metric of the last evaluation made by `seconds` of wall-clock time or by `epochs`."""
    value = None
    for record in records:
        if record.get("kind") not in ("eval", "final_eval"):
            continue
        if seconds is not None and record["wall_s"] > seconds:
            break
        if epochs is not None and (not cases_per_epoch or record["examples_grad"] / cases_per_epoch > epochs):
            break
        figure = record.get("val", {}).get(metric)
        value = figure if figure is not None and math.isfinite(figure) else value
    return value


def sgn_rows(runs: dict[tuple[str, str], list[dict]], at_seconds: list[float],
             at_epochs: list[float]) -> tuple[list[dict], list[str]]:
    """Per (task, solver): the mean held-out metric at each time and epoch; and the column names."""
    columns = [f"metric @{t:g}s" for t in at_seconds]
    columns += [f"metric @{e:g}ep" for e in at_epochs]
    out = []
    for (task, label), summaries in sorted(runs.items()):
        metric = next((s["metric"] for s in summaries if s.get("metric")), None)
        loaded = [(read_metrics(Path(s["_path"])), s) for s in summaries]
        loaded = [(records, s) for records, s in loaded if records is not None]
        if metric is None or not loaded:
            continue
        row = {"task": task, "solver": label, "runs": len(loaded), "metric": metric}
        for t in at_seconds:
            values = [v for records, _ in loaded if (v := metric_at(records, metric, seconds=t)) is not None]
            row[f"metric @{t:g}s"] = statistics.mean(values) if values else None
        for e in at_epochs:
            values = []
            for records, s in loaded:
                cases = s["examples_grad"] / s["epochs"] if s.get("epochs") else None
                v = metric_at(records, metric, epochs=e, cases_per_epoch=cases)
                if v is not None:
                    values.append(v)
            row[f"metric @{e:g}ep"] = statistics.mean(values) if values else None
        out.append(row)
    return out, ["task", "solver", "runs", "metric", *columns]


def render(table_rows: list[dict], fmt: str, columns: list[str] = COLUMNS) -> str | Table:
    """The rows as a rich Table (fmt "table"), a Markdown table or CSV text."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows([["" if row[c] is None else row[c] if not isinstance(row[c], list) else
                           " ".join(map(str, row[c])) for c in columns] for row in table_rows])
        return buffer.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in table_rows]
        return "\n".join(lines) + "\n"
    table = Table(title="runs")
    for column in columns:
        table.add_column(column)
    for row in table_rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    return table


def read_metrics(summary_path: Path) -> list[dict] | None:
    """The records of metrics.jsonl beside a summary.json, or None where the run has none; a line cut short
    (a crash while writing) ends the records."""
    path = Path(summary_path).parent / "metrics.jsonl"
    if not path.is_file():
        return None
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


X_AXES = (("wall_s", "wall-clock seconds"), ("examples", "examples processed (gradient + curvature)"),
          ("update", "updates"))


def curves(records: list[dict], kind: str, value: Callable[[dict], float | None]) -> dict[str, tuple[list, list]]:
    """x key → (xs, ys) of the records of one kind whose value is finite."""
    kinds = (kind, "final_eval") if kind == "eval" else (kind,)
    chosen = [(r, value(r)) for r in records if r.get("kind") in kinds]
    chosen = [(r, v) for r, v in chosen if v is not None and math.isfinite(v)]
    out = {}
    for key, _ in X_AXES:
        xs = [r["examples_grad"] + r["examples_curv"] if key == "examples" else r[key] for r, _ in chosen]
        out[key] = (xs, [v for _, v in chosen])
    return out


def band(runs: list[tuple[list, list]], points: int = 200):
    """(grid, mean, low, high, count) over runs on a common grid from the earliest start to the latest end:
    at each point the mean, minimum and maximum of the runs that reach it (interpolated), and how many do.
    None when no run has a point."""
    import numpy as np

    runs = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in runs if len(x)]
    if not runs:
        return None
    start, end = min(x[0] for x, _ in runs), max(x[-1] for x, _ in runs)
    grid = np.linspace(start, end, points) if end > start else np.array([end])
    values = np.stack([np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan) for x, y in runs])
    count = np.isfinite(values).sum(0)
    keep = count > 0
    values, grid, count = values[:, keep], grid[keep], count[keep]
    return grid, np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0), count


def plot(runs: dict[tuple[str, str], list[dict]], path: Path) -> list[str]:
    """Write the figure described in the module docstring to `path`; returns the runs left out (no metrics)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HfrunError("--plot needs matplotlib, which is not installed here: pip install matplotlib "
                         "(or reinstall hfrun, which depends on it).") from None
    left_out, series = [], {}
    for (task, label), summaries in sorted(runs.items()):
        loaded = []
        for summary in summaries:
            records = read_metrics(Path(summary["_path"]))
            if records is None:
                left_out.append(str(Path(summary["_path"]).parent))
            else:
                loaded.append((records, summary.get("metric")))
        if loaded:
            series[f"{task} · {label}"] = loaded
    if not series:
        raise HfrunError("No run below these directories has a metrics.jsonl to plot (runs write it since "
                         "`hfrun-report --plot` exists). Report without --plot, or run them again.")
    figure, axes = plt.subplots(2, len(X_AXES), figsize=(5 * len(X_AXES), 8), squeeze=False)
    metric_names = set()
    for name, loaded in series.items():
        metric = next((m for _, m in loaded if m), None)
        metric_names.add(metric)
        rows_of_curves = [[curves(records, "update", lambda r: r.get("loss")) for records, _ in loaded],
                          [curves(records, "eval", lambda r: r.get("val", {}).get(metric)) for records, _ in loaded]]
        for row, per_run in enumerate(rows_of_curves):
            for column, (key, _) in enumerate(X_AXES):
                summary_band = band([c[key] for c in per_run])
                if summary_band is None:
                    continue
                grid, mean, low, high, count = summary_band
                runs_with_points = sum(1 for c in per_run if c[key][0])
                line, = axes[row][column].plot(grid, mean, marker="o" if len(grid) < 2 else None,
                                               label=f"{name} ({runs_with_points} runs)")
                if runs_with_points > 1:
                    axes[row][column].fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    metric_label = ", ".join(sorted(str(m) for m in metric_names if m)) or "metric"
    for row, what in enumerate(("training loss", f"held-out {metric_label}")):
        for column, (_, x_label) in enumerate(X_AXES):
            ax = axes[row][column]
            ax.set_xlabel(x_label)
            ax.set_ylabel(what)
            values = [v for line in ax.get_lines() for v in line.get_ydata()]
            if values and min(values) > 0 and max(values) / min(values) > 100:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle("mean over runs, band from minimum to maximum")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except (OSError, ValueError) as error:
        raise HfrunError(f"The figure could not be written to {path} ({error}). Give a writable path ending in "
                         ".png (or another format matplotlib knows, e.g. .pdf, .svg).") from None
    finally:
        plt.close(figure)
    return left_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hfrun-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--split-by", action="append", default=[], metavar="KEY",
                        help="a dotted config key, e.g. solver.lr, whose values get separate rows")
    parser.add_argument("--format", choices=["table", "markdown", "csv"], default="table",
                        help="the console table (default), a Markdown table, or CSV")
    parser.add_argument("--layout", choices=["runs", "ms2011", "sgn"], default="runs",
                        help="the table: runs (default), M&S 2011 Figure 3 beside hfrun's, or SGN's metric at "
                             "given seconds and epochs")
    parser.add_argument("--at-seconds", default="10,100", help="with --layout sgn: wall-clock seconds, e.g. 10,100")
    parser.add_argument("--at-epochs", default="1,5", help="with --layout sgn: epochs, e.g. 1,5")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="also draw the loss and held-out metric curves of the runs into this image")
    args = parser.parse_args(argv)
    errors = Console(stderr=True)
    try:
        runs = collect(args.directories, tuple(args.split_by))
        table_rows = rows(runs)
    except HfrunError as error:
        errors.print(f"[bold red]hfrun-report:[/] {error}")
        sys.exit(1)
    if args.layout == "ms2011":
        table_rows, columns = ms2011_rows(table_rows), MS2011_COLUMNS
    elif args.layout == "sgn":
        try:
            table_rows, columns = sgn_rows(runs, [float(t) for t in args.at_seconds.split(",") if t],
                                           [float(e) for e in args.at_epochs.split(",") if e])
        except ValueError as error:
            errors.print(f"[bold red]hfrun-report:[/] --at-seconds and --at-epochs take numbers separated by "
                         f"commas, e.g. 10,100 ({error})")
            sys.exit(1)
    else:
        columns = COLUMNS
    rendered = render(table_rows, args.format, columns)  # the table first, whatever happens to the figure
    if isinstance(rendered, str):
        sys.stdout.write(rendered)
    else:
        Console(width=220).print(rendered)
    if args.plot:
        try:
            left_out = plot(runs, args.plot)
        except HfrunError as error:
            errors.print(f"[bold red]hfrun-report:[/] {error}")
            sys.exit(1)
        errors.print(f"wrote {args.plot}" + (f"; left out (no metrics.jsonl): {', '.join(left_out)}"
                                             if left_out else ""))


if __name__ == "__main__":
    main()
