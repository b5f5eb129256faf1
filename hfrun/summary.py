"""summary.json: the final figures of a run, machine-readable, as standard JSON.

Statuses (`status`):
  solved         the task's success criterion held (at a scheduled evaluation or the final one)
  budget         run.max_updates, run.max_seconds or run.max_minibatches was spent
  early_stopped  run.early_stop.patience evaluations without improvement
  stalled        the solver reported that it can make no more progress (e.g. HF's λ at damping_max)
  diverged       the loss or the parameters became NaN/inf
  interrupted    Ctrl-C; checkpoints/last.pt holds the state, run.resume continues it
  error          the run could not go on (a file could not be written, an unexpected exception), or,
                 in a sweep, a job whose config was refused; `message` says why

Non-finite numbers are written as null, and `non_finite` maps each such key to what it was ("nan",
"inf", "-inf"), so that strict JSON readers accept the file and nothing is lost.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from hfrun.checkpoint import write_atomically

STATUSES = ("solved", "budget", "early_stopped", "stalled", "diverged", "interrupted", "error")
# Statuses of a run that ended by its own outcome: the attempts a failure rate counts.
FINISHED = ("solved", "budget", "early_stopped", "stalled", "diverged")


def json_safe(record: dict) -> dict:
    """`record` with NaN/±inf floats replaced by None and recorded under `non_finite`, nested dicts too (their
    keys dotted, e.g. {"val.error": "inf"})."""
    non_finite = {}

    def safe(path: str, value):
        if isinstance(value, dict):
            return {key: safe(f"{path}.{key}", item) for key, item in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            non_finite[path] = str(value)
            return None
        return value

    cleaned = {key: safe(str(key), value) for key, value in record.items()}
    if non_finite:
        cleaned["non_finite"] = non_finite
    return cleaned


def write_summary(path: Path, summary: dict) -> dict:
    """Write `summary` atomically as strict JSON; return what was written."""
    safe = json_safe(summary)
    text = json.dumps(safe, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda handle: handle.write(text.encode()))
    return safe


def read_summary(path: Path) -> dict:
    return json.loads(Path(path).read_text())
