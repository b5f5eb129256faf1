"""Config helpers shared by the CLI and the tests: custom OmegaConf resolvers and the config path."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _run_dir(resume, default):
    """A resumed run continues in its own directory; a new one gets the default."""
    return str(resume) if resume not in (None, "", "null") else default


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("hfrun_run_dir"):
        OmegaConf.register_new_resolver("hfrun_run_dir", _run_dir)
