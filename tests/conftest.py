"""Shared fixtures: compose the real config tree, run the engine in a temporary directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from hfrun.config import CONFIG_DIR, register_resolvers

register_resolvers()
REPO = CONFIG_DIR.parent
HFRUN = Path(sys.executable).parent / "hfrun"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["logger.progress=false", *overrides])


@pytest.fixture
def make_config():
    return compose_config


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """The engine sets flush-to-zero, seeds and (run.threads) the thread count; keep tests independent of each
    other (a thread count left behind changes the rounding of later runs, and so their trajectories)."""
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    yield
    torch.set_rng_state(state)
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def run_hfrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `hfrun` console command as a user would."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "COLUMNS": "120"}
    return subprocess.run([str(HFRUN), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
