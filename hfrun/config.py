"""Config helpers shared by the CLI and the tests: custom OmegaConf resolvers and the config path."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _run_dir(resume, default):
    """A resumed run continues in its own directory; a new one gets the default."""
    return str(resume) if resume not in (None, "", "null") else default


def _hydra_subdir(resume, stamp):
    """Hydra's own record of the command; a resume keeps the original run's `.hydra` and adds its own."""
    return ".hydra" if resume in (None, "", "null") else f".hydra/resume_{stamp}"


def register_resolvers() -> None:
    for name, resolver in (("hfrun_run_dir", _run_dir), ("hfrun_hydra_subdir", _hydra_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
