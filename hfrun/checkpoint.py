"""One checkpoint format: atomic save, safe load; and the one atomic writer every run file goes through.

A checkpoint is a plain dict of tensors and Python scalars (model, solver
state, RNG states, data-stream state, counters, the config as YAML), so it
loads with `torch.load(weights_only=True)`: no pickled code runs on load.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Callable, IO

import torch

from hfrun.errors import HfrunError


CHECKPOINT_KEYS = ("model", "solver", "stream", "progress", "rng", "config")


class OutputError(HfrunError):
    """A run file could not be written (full disk, read-only or vanished directory)."""


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write(handle)` to a temporary file in the same directory, fsync it, rename over `path`.

    The rename is atomic, so a run stopped at any moment (even by SIGKILL) leaves either the old file or
    the new one, never a half-written one. An OSError becomes an `OutputError` that names the file, the
    reason and what to do; the old file is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(output_error_message(path, error)) from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass


def output_error_message(path: Path, error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        advice = (f"The disk holding {path.parent} is full: free space there (or point hydra.run.dir at another "
                  "disk)")
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = (f"{path.parent} is not writable: run from a writable working directory or give "
                  "hydra.run.dir=<a writable directory>")
    else:
        advice = f"Check that {path.parent} exists and is writable"
    return (f"Could not write {path} ({reason}). {advice}. Files written before this one are intact "
            "(every run file is replaced atomically).")


def save_checkpoint(state: dict, path: Path) -> None:
    # Serialized in memory first: torch.save writing to a full disk raises a RuntimeError from its zip
    # writer ("unexpected pos"), where a plain write raises the OSError (ENOSPC) that names the problem.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, lambda handle: handle.write(buffer.getbuffer()))


def require_checkpoint(path: Path) -> None:
    if not Path(path).is_file():
        raise HfrunError(f"No checkpoint at {path}. run.resume must name a run directory that holds "
                         "checkpoints/last.pt (a run that got through at least one checkpoint).")


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint onto the CPU, or explain why it cannot be used."""
    path = Path(path)
    require_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise HfrunError(f"The checkpoint {path} could not be read ({type(error).__name__}: {error}). "
                         "It is corrupt or not an hfrun checkpoint; resume from another run directory "
                         "or start afresh.") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise HfrunError(f"The checkpoint {path} is not an hfrun checkpoint: it lacks {', '.join(missing)}. "
                         "Resume from another run directory or start afresh.")
    return state
