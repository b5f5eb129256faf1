"""The run directory's life around Hydra: checked before Hydra writes into it, undone when a start is
refused, and a sweep's failed jobs listed at its end.

Hydra creates the run directory, writes `.hydra/` and opens `run.log` before hfrun sees the config, so a
start that hfrun then refuses (a bad value, a model that does not fit the task) would leave that behind,
and a refused `run.resume` would add a `.hydra/resume_*` record to a real run. `RunGuard`, a Hydra
callback (configs/config.yaml, `hydra.callbacks`), runs before any of that:

- `on_run_start` refuses a resume without a checkpoint and an output directory that cannot be written,
  with one paragraph and exit status 1, before anything is created; otherwise it notes what exists, so
  that `undo_start()` can remove exactly what this start added when the run is refused later. A
  time-stamped run directory is claimed atomically: a second run started in the same second gets
  `<stamp>_2` instead of sharing (and overwriting) the first one's.
- `on_multirun_end` reads the summary.json of every job of the sweep and, when any job failed (status
  `error`: refused or crashed), names each with its overrides and reason and exits with status 1 after
  every job has run.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from hfrun.checkpoint import require_checkpoint
from hfrun.distributed import launched_rank
from hfrun.errors import HfrunError
from hfrun.logging import console, print_error
from hfrun.summary import read_summary


@dataclass
class StartRecord:
    """What existed before Hydra set up this run, so that a refused start can be taken back exactly."""

    run_dir: Path
    created_dirs: list[Path] = field(default_factory=list)  # made by this start, outermost first
    hydra_subdir: Path | None = None  # Hydra's record of this command, its outermost new folder
    hydra_files: dict[Path, bytes] = field(default_factory=dict)  # the record's files already there, to put back
    run_log_size: int | None = None  # run.log's size before this start; None: it did not exist


_start: StartRecord | None = None


def _refuse(message: str) -> None:
    print_error(message, to_run_log=False)  # before Hydra has opened run.log; its own handler would echo it
    sys.exit(1)


def _make_writable_dir(directory: Path, claim: bool = False) -> tuple[Path, list[Path]]:
    """Create `directory` (and missing parents; with `claim`, a name no other run has, see `_claim_new`)
    and check that a file can be written in it; return it with the directories created. On failure,
    remove them again and refuse the start."""
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    missing.reverse()
    try:
        if claim:
            directory = _claim_new(directory)
            if directory not in missing:
                missing.append(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        _remove_empty(missing)
        _refuse(f"Cannot write the run directory {directory} ({error.strerror or error}). Run hfrun from a "
                "writable working directory, or give hydra.run.dir=<a writable directory> (hydra.sweep.dir=... "
                "for a sweep with -m). Nothing was written.")
    return directory, missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            pass


def undo_start() -> None:
    """Remove what Hydra and this start wrote for a run that was then refused: Hydra's record of the
    command, this start's part of run.log, and the directories it created (when empty)."""
    if _start is None:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == _start.run_dir:
            root.removeHandler(handler)
            handler.close()
    run_log = _start.run_dir / "run.log"
    if _start.run_log_size is None:
        run_log.unlink(missing_ok=True)
    elif run_log.is_file():
        os.truncate(run_log, _start.run_log_size)
    if _start.hydra_subdir is not None:
        shutil.rmtree(_start.hydra_subdir, ignore_errors=True)
    for path, content in _start.hydra_files.items():  # Hydra overwrote an earlier run's record: restore it
        path.write_bytes(content)
    _remove_empty(_start.created_dirs)


def _named_by_time(config: DictConfig) -> bool:
    """Whether the run directory is the default time-stamped one (not a path the user gave)."""
    written = OmegaConf.to_container(config.hydra.run, resolve=False).get("dir", "")
    return "${now:" in str(written)


def _claim_new(run_dir: Path) -> Path:
    """A run directory no other run has: two runs started in the same second would otherwise share the
    time-stamped one and overwrite each other's files. mkdir is atomic, so exactly one run claims a name;
    the next gets `_2`, `_3`, …"""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = run_dir if attempt == 1 else run_dir.with_name(f"{run_dir.name}_{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    return run_dir


def selected(config: DictConfig, key: str):
    """config's value at `key`, or None where it cannot be resolved."""
    try:
        return OmegaConf.select(config, key)
    except Exception:  # an interpolation that fails here fails in Hydra too, with its own message
        return None


class RunGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _start
        resume = selected(config, "run.resume")
        if isinstance(resume, str) and resume and launched_rank() == 0:
            # data parallel: rank 0 alone reads the checkpoint and hands it on, so only its disk must hold it
            try:
                require_checkpoint(Path(resume) / "checkpoints" / "last.pt")
            except HfrunError as error:
                _refuse(str(error))
        directory, subdir = selected(config, "hydra.run.dir"), selected(config, "hydra.output_subdir")
        if directory is None:
            return
        run_dir = Path(os.path.abspath(str(directory)))
        if _named_by_time(config) and not (isinstance(resume, str) and resume):
            run_dir, created_dirs = _make_writable_dir(run_dir, claim=True)
            with read_write(config.hydra.run):
                config.hydra.run.dir = str(run_dir)
        else:
            run_dir, created_dirs = _make_writable_dir(run_dir)
        run_log = run_dir / "run.log"
        record = StartRecord(run_dir, created_dirs=created_dirs,
                             run_log_size=run_log.stat().st_size if run_log.is_file() else None)
        if subdir is not None:
            hydra_subdir = run_dir / str(subdir)
            new = [path for path in (hydra_subdir, *hydra_subdir.parents) if path.is_relative_to(run_dir)
                   and path != run_dir and not path.exists()]
            record.hydra_subdir = new[-1] if new else None
            if hydra_subdir.is_dir():
                record.hydra_files = {path: path.read_bytes() for path in hydra_subdir.iterdir() if path.is_file()}
        _start = record

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        directory = selected(config, "hydra.sweep.dir")
        if directory is not None:  # Hydra names its job folders itself; only the folder's place is checked here
            _make_writable_dir(Path(os.path.abspath(str(directory))))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        directory = selected(config, "hydra.sweep.dir")
        if directory is None:
            return
        jobs = sorted((path.parent.parent for path in Path(str(directory)).rglob(".hydra/overrides.yaml")),
                      key=lambda path: str(path))
        failures = [line for line in map(_failure, jobs) if line]
        diverged = [job.name for job in jobs if (job / "summary.json").is_file()
                    and read_summary(job / "summary.json").get("status") == "diverged"]
        if diverged:  # an outcome of the settings (e.g. a learning rate too large), not a failure of the job
            console.print(f"{len(diverged)} of {len(jobs)} jobs diverged (an outcome, not a failure): "
                          f"{', '.join(diverged)}", markup=False)
        if failures:
            console.print(f"[bold red]{len(failures)} of {len(jobs)} jobs of the sweep in {directory} failed:[/]")
            for line in failures:
                console.print(f"  {line}", markup=False)
            sys.exit(1)


def _failure(job_dir: Path) -> str | None:
    """One line naming a failed job and why, or None when the job ran to an outcome."""
    overrides = " ".join(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    summary_path = job_dir / "summary.json"
    if not summary_path.is_file():
        return f"{job_dir.name} ({overrides}): ended without a summary.json (killed?); see {job_dir / 'run.log'}"
    summary = read_summary(summary_path)
    if summary.get("status") != "error":
        return None
    return f"{job_dir.name} ({overrides}): {summary.get('message', 'no message')}"
