"""Where a run reports: TensorBoard scalars, a live rich progress line, the final table.

Every solver logs through the same call, `RunLogger.log_update(update, stats)`:
the loss under `train/`, counters under `counts/`, wall time under `time/` and
every other statistic the solver returns (learning rate, λ, ρ, CG iterations…)
under `solver/`.
"""
from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

console = Console(stderr=True)

COUNTERS = ("examples_grad", "examples_curv")


class RunLogger:
    def __init__(self, run_dir: Path, config_yaml: str, *, tensorboard: bool, progress: bool,
                 max_updates: int, start_update: int, metric_name: str):
        self.metric_name = metric_name
        self.writer = None
        if tensorboard:
            # purge_step drops events a stopped run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_update + 1 if start_update else None)
            if not start_update:
                self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)
        self.progress = None
        if progress:
            self.progress = Progress(TextColumn("[bold]update {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("loss {task.fields[loss]}"),
                                     TextColumn("val {task.fields[metric_name]} {task.fields[metric]}"),
                                     TimeElapsedColumn(), console=console, transient=False)
            self.progress_task = self.progress.add_task("train", total=max_updates, completed=start_update,
                                                        loss="-", metric="-", metric_name=metric_name)
            self.progress.start()

    def log_update(self, update: int, stats: dict[str, float], counters: dict[str, float], wall_time: float) -> None:
        if self.writer:
            self.writer.add_scalar("train/loss", stats["loss"], update)
            for key, value in stats.items():
                if key != "loss" and key not in COUNTERS:
                    self.writer.add_scalar(f"solver/{key}", value, update)
            for key in COUNTERS:
                self.writer.add_scalar(f"counts/{key}", counters[key], update)
            self.writer.add_scalar("time/wall_s", wall_time, update)
        if self.progress:
            self.progress.update(self.progress_task, completed=update, loss=f"{stats['loss']:.4g}")

    def log_eval(self, update: int, metrics: dict[str, float]) -> None:
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, update)
        if self.progress:
            self.progress.update(self.progress_task, metric=f"{metrics.get(self.metric_name, math.nan):.4g}")

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.writer:
            self.writer.close()


def print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['task']} · {summary['solver']} · seed {summary['seed']}: {summary['status']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("task", "solver", "seed", "config"):
            continue
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)


def print_error(message: str) -> None:
    console.print(f"[bold red]hfrun error:[/] {message}")
