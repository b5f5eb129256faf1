"""Where a run reports: TensorBoard scalars and HParams, metrics.jsonl, a live rich progress line, the final
table, and run.log.

Every solver logs through the same call, `RunLogger.log_update(update, stats)`:
the loss under `train/`, counters under `counts/`, wall time under `time/` and
every other numeric statistic the solver returns (learning rate, λ, ρ, CG
iterations…) under `solver/`.

metrics.jsonl holds the same per-update figures, one JSON object per line: {"kind": "update", "update",
"wall_s", "examples_grad", "examples_curv", "loss", <solver statistics: numbers, and short text TensorBoard cannot
plot, such as HF's `cg_stop`>} after each update and {"kind": "eval",
"update", "wall_s", "examples_grad", "examples_curv", "val": {metric: value}} after each evaluation (kind
"final_eval" for the evaluation of the model a run stopped at between scheduled ones). It is
what `hfrun-report --plot` reads: plain JSON that any tool can read, written whether TensorBoard is on or off,
where reading TensorBoard's event files back would need its reader and its purge rules. A resumed run drops
the lines after its checkpoint's update (as TensorBoard's purge_step does) and the stopped session's final
evaluation, so the file continues as if the run had never stopped.

At the end of a run (`close(summary)`), the HParams entry records the run's hyperparameters and its final
figures, so that TensorBoard's HParams tab compares a sweep's runs.

run.log is the console log: Hydra's file handler writes the log messages to it,
and `record` (a logger that writes to that file only) adds what the console
shows in other ways: one line per evaluation in place of the progress line's
redraws, the final table, errors and the run directory. Outside Hydra (a test,
a library user) `record` has no handler and writes nothing.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from torch.utils.tensorboard import SummaryWriter

from hfrun.checkpoint import OutputError, output_error_message, write_atomically
from hfrun.summary import json_safe

console = Console(stderr=True)
record = logging.getLogger("hfrun.record")  # configs/config.yaml sends it to run.log only

COUNTERS = ("examples_grad", "examples_curv")
METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    """metrics.jsonl of a run (see the module docstring): opened for appending, each line flushed as written."""

    def __init__(self, path: Path, start_update: int):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if start_update and path.is_file():
                self._keep_up_to(start_update)
            self.file = path.open("a" if start_update else "w", encoding="utf-8")
        except OSError as error:
            raise OutputError(output_error_message(path, error)) from None

    def _keep_up_to(self, update: int) -> None:
        """Drop the lines a stopped run wrote after its checkpoint (the file is replaced atomically)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["update"] <= update and record["kind"] != "final_eval":
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a line cut short by a crash: it and anything after it go
        text = "".join(line + "\n" for line in kept).encode()
        write_atomically(self.path, lambda handle: handle.write(text))

    def write(self, record: dict) -> None:
        """One record as strict JSON: a NaN or infinite figure is written as null and named under non_finite
        (`summary.json_safe`, as summary.json does), e.g. {"rho": null, ..., "non_finite": {"rho": "nan"}};
        "val.error" for a held-out figure."""
        try:
            self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.file.flush()
        except OSError as error:
            raise OutputError(output_error_message(self.path, error)) from None

    def close(self) -> None:
        self.file.close()


def hparams_of(config: dict) -> dict[str, float | int | str | bool]:
    """The run's hyperparameters for TensorBoard's HParams tab: the task, model and solver chosen, the seed,
    and every scalar setting under solver, model and task (lists and tables as text), flattened with dots."""
    def flatten(prefix: str, value) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() if key == "_target_" or not str(key).startswith("_")
                    for k, v in flatten(f"{prefix}.{key}", item).items()}
        if value is None or isinstance(value, (list, tuple)):
            return {prefix: str(value)}
        return {prefix: value} if isinstance(value, (bool, int, float, str)) else {prefix: str(value)}

    hparams = {"seed": config.get("seed")}
    for group in ("task", "model", "solver"):
        hparams.update(flatten(group, config.get(group) or {}))
    return {key: value for key, value in hparams.items()
            if value is not None and value != "???" and "solver_hints" not in key}


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLogger:
    def __init__(self, run_dir: Path, config_yaml: str, *, tensorboard: bool, progress: bool,
                 max_updates: int, start_update: int, metric_name: str, max_seconds: float | None = None,
                 max_minibatches: float | None = None, minibatch_size: int = 1000,
                 start_seconds: float = 0.0, hparams: dict | None = None, start_counters: dict | None = None):
        self.metric_name, self.max_updates, self.max_seconds = metric_name, max_updates, max_seconds
        self.max_minibatches, self.minibatch_size = max_minibatches, minibatch_size
        self.start_update, self.start_seconds, self.started = start_update, start_seconds, time.monotonic()
        self.loss, self.metric, self.wall_time = "-", "-", start_seconds
        self.hparams = hparams or {}
        self.counters = {key: (start_counters or {}).get(key, 0) for key in COUNTERS}
        self.start_minibatches = self._minibatches()
        self.writer = None
        if tensorboard:
            # purge_step drops events a stopped run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_update + 1 if start_update else None)
            if not start_update:
                self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)
        self.metrics_file = MetricsFile(Path(run_dir) / METRICS_FILE, start_update)
        self.progress = None
        if progress:
            # The bar shows the share of the budget spent: updates, seconds or minibatches, whichever binds first.
            self.progress = Progress(TextColumn("[bold]{task.fields[where]}"), BarColumn(),
                                     TextColumn("loss {task.fields[loss]}"),
                                     TextColumn("val {task.fields[metric_name]} {task.fields[metric]}"),
                                     TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                                     console=console, transient=False)
            self.progress_task = self.progress.add_task(
                "train", total=1.0, completed=self._budget_spent(start_update, start_seconds),
                where=self._where(start_update), loss="-", metric="-", metric_name=metric_name, eta="-")
            self.progress.start()

    def _minibatches(self) -> float:
        """Minibatches so far in the summary's unit (run.max_minibatches counts these)."""
        return sum(self.counters.values()) / self.minibatch_size

    def _where(self, update: int) -> str:
        budget = f"/{self.max_updates}"
        if self.max_seconds is not None:
            budget += f" or {self.max_seconds:g} s"
        if self.max_minibatches is not None:
            budget += f" or {self._minibatches():.4g}/{self.max_minibatches:g} minibatches"
        return f"update {update}{budget}"

    def _budget_spent(self, update: int, seconds: float) -> float:
        share = update / self.max_updates
        if self.max_seconds is not None:
            share = max(share, seconds / self.max_seconds)
        if self.max_minibatches is not None:
            share = max(share, self._minibatches() / self.max_minibatches)
        return min(share, 1.0)

    def _eta(self, update: int, seconds: float) -> str:
        """Time to the first budget that binds, from the pace of this session's updates and minibatches."""
        done = update - self.start_update
        if done <= 0:
            return "-"
        elapsed = time.monotonic() - self.started
        remaining = (self.max_updates - update) * elapsed / done
        if self.max_seconds is not None:
            remaining = min(remaining, self.max_seconds - seconds)
        minibatches_done = self._minibatches() - self.start_minibatches
        if self.max_minibatches is not None and minibatches_done > 0:
            remaining = min(remaining, (self.max_minibatches - self._minibatches()) * elapsed / minibatches_done)
        return _clock(remaining)

    def log_update(self, update: int, stats: dict, counters: dict[str, float], wall_time: float) -> None:
        self.loss = f"{stats['loss']:.4g}"
        self.counters = {key: counters[key] for key in COUNTERS}
        self.metrics_file.write({"kind": "update", "update": update, "wall_s": wall_time, **self.counters,
                                 **{key: value for key, value in stats.items() if key not in COUNTERS
                                    and isinstance(value, (int, float, str))}})
        if self.writer:
            self.writer.add_scalar("train/loss", stats["loss"], update)
            for key, value in stats.items():
                if key != "loss" and key not in COUNTERS and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"solver/{key}", value, update)
            for key in COUNTERS:
                self.writer.add_scalar(f"counts/{key}", counters[key], update)
            self.writer.add_scalar("time/wall_s", wall_time, update)
        self.wall_time = wall_time
        if self.progress:
            self.progress.update(self.progress_task, completed=self._budget_spent(update, wall_time),
                                 where=self._where(update), loss=self.loss, eta=self._eta(update, wall_time))

    def log_eval(self, update: int, metrics: dict[str, float], final: bool = False) -> None:
        """An evaluation's figures; `final` for the one a run makes of the model it stopped at between
        scheduled evaluations (metrics.jsonl kind "final_eval", dropped if the run is resumed)."""
        self.metrics_file.write({"kind": "final_eval" if final else "eval", "update": update,
                                 "wall_s": self.wall_time, **self.counters, "val": dict(metrics)})
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, update)
        self.metric = f"{metrics.get(self.metric_name, math.nan):.4g}"
        record.info("update %d: loss %s, val %s %s, %s elapsed", update, self.loss, self.metric_name, self.metric,
                    _clock(self.wall_time))
        if self.progress:
            self.progress.update(self.progress_task, metric=self.metric)

    def close(self, summary: dict | None = None) -> None:
        """Stop the progress line and close the files, each on its own (a full disk must not keep the others
        open); with the run's summary, first write its HParams entry."""
        if self.progress:
            self.progress.stop()
        try:
            self.metrics_file.close()
        except OSError as error:
            say(f"{self.metrics_file.path} could not be closed ({error}); its last lines may be missing.")
        if self.writer:
            if summary is not None and self.hparams:
                self._write_hparams(summary)
            try:
                self.writer.close()
            except OSError as error:
                say(f"TensorBoard's event file could not be closed ({error}); its last events may be missing.")

    def _write_hparams(self, summary: dict) -> None:
        figures = {f"hparams/{key}": value for key, value in summary.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and (key.startswith(("final_", "best_")) or key in ("updates", "minibatches", "wall_time_s"))}
        figures["hparams/solved"] = float(bool(summary.get("solved")))
        try:
            self.writer.add_hparams(self.hparams, figures, run_name=".", global_step=summary.get("updates"))
        except Exception as error:  # noqa: BLE001 - the run's results are saved; only the tab lacks it
            say(f"TensorBoard's HParams entry could not be written ({type(error).__name__}: {error}).")


def _as_text(renderable) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=100, color_system=None, force_terminal=False).print(renderable)
    return buffer.getvalue().rstrip()


def print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['task']} · {summary['solver']} · seed {summary['seed']}: {summary['status']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("task", "solver", "seed", "config", "message", "non_finite"):
            continue
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)
    record.info("summary\n%s", _as_text(table))
    if summary.get("message") and summary["status"] not in ("diverged", "error"):
        say(summary["message"])


def say(message: str) -> None:
    """A line for the user: on the console and in run.log."""
    console.print(message, markup=False)
    record.info("%s", message)


def print_error(message: str, to_run_log: bool = True) -> None:
    """An error, once: on the console and (unless there is no run.log yet) in run.log."""
    console.print(Text.assemble(("hfrun error: ", "bold red"), message))  # the message is not markup
    if to_run_log:
        record.error("%s", message)
