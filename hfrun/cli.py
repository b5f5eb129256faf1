"""The `hfrun` command: Hydra composes the config, the engine runs it."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hfrun.config import CONFIG_DIR, register_resolvers
from hfrun.engine import train
from hfrun.errors import HfrunError
from hfrun.logging import console, print_error

register_resolvers()
log = logging.getLogger("hfrun")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration; return the value a sweep minimizes (the best validation objective)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    single_run = hydra_cfg.mode == RunMode.RUN
    try:
        summary = train(cfg, run_dir)
    except HfrunError as error:
        log.error("%s", error)
        print_error(str(error))
        if single_run:
            sys.exit(1)
        return math.inf  # let the rest of a sweep go on
    console.print(f"run directory: [bold]{run_dir}[/]")
    if summary["status"] == "diverged":
        print_error(summary["message"])
        if single_run:
            sys.exit(1)
        return math.inf
    return summary[f"best_val_{summary['objective']}"]
