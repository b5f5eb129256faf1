"""One checkpoint format: atomic save, safe load.

A checkpoint is a plain dict of tensors and Python scalars (model, solver
state, RNG states, data-stream state, counters, the config as YAML), so it
loads with `torch.load(weights_only=True)`: no pickled code runs on load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from hfrun.errors import HfrunError


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename over `path`.

    The rename is atomic, so a run stopped at any moment leaves either the old
    checkpoint or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint onto the CPU, or explain why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise HfrunError(f"No checkpoint at {path}. run.resume must name a run directory that holds "
                         "checkpoints/last.pt (a run that got through at least one checkpoint).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise HfrunError(f"The checkpoint {path} could not be read ({type(error).__name__}: {error}). "
                         "It is corrupt or not an hfrun checkpoint; resume from another run directory "
                         "or start afresh.") from None
