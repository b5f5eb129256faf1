"""The training loop: budget, evaluation, early stopping, checkpoints, logging calls.

The engine knows nothing about any particular solver. Per update it calls
`solver.step(stream)`, adds the examples the solver reports to the run's cost
counters (the one place costs are counted), logs, evaluates on the task's
schedule, keeps `best.pt`, stops early, and writes `last.pt` so that a stopped
run resumes exactly where it stopped.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from hfrun.allocator import keep_freed_memory, release_free_memory
from hfrun.checkpoint import OutputError, load_checkpoint, save_checkpoint
from hfrun.config import check_option_types
from hfrun.distributed import (ShardedStream, adopt_submitit_environment, from_environment,
                               is_collective_failure, launched_world_size)
from hfrun.errors import HfrunError
from hfrun.logging import RunLogger, hparams_of, print_summary, record
from hfrun.summary import write_summary

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Config groups that must match between a run and its resumption (budgets may change).
RESUME_MUST_MATCH = ("task", "model", "solver", "seed", "run.dtype", "run.flush_denormal")
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass
class Progress:
    """Counters and stopping state; saved in every checkpoint."""

    update: int = 0
    examples_grad: int = 0
    examples_curv: int = 0
    wall_time_s: float = 0.0
    last_train_loss: float = math.nan
    best_train_loss: float = math.inf
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    best_score: float = math.inf
    best_update: int = 0
    evals_without_improvement: int = 0
    solved_at: dict = field(default_factory=dict)
    eval_update: int = -1  # the update at which last_eval was taken (-1: none yet)


# ---------------------------------------------------------------- validation

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise HfrunError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_run_config(cfg: DictConfig) -> None:
    """Check types and ranges of `seed` and the `run` group; name the bad key and how to fix it."""
    unset = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("model."))  # model: from task
    _require(not unset, f"{', '.join(unset)} must be set: the config leaves it as ???. Give it on the command "
             "line, e.g. task.T=30 (a pathological task's minimum length), or pick a config that sets it, "
             "e.g. task=addition_T30.")
    _require(_is_int(cfg.seed) and SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1],
             f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (what torch's generators take), "
             f"got {cfg.seed!r}. Example: seed=3.")
    for group in ("task", "solver"):
        name = OmegaConf.select(cfg, f"{group}.name")
        _require(isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name,
                 f"{group}.name names the run directory (outputs/<task>/<solver>/...), so it must be a plain name "
                 f"without / or .., got {name!r}.")
    run = cfg.run
    _require(isinstance(run.get("early_stop"), DictConfig),
             f"run.early_stop must be a group of keys (patience, metric, min_delta), got {run.get('early_stop')!r}. "
             "Set its keys instead, e.g. run.early_stop.patience=5.")
    min_delta = run.early_stop.min_delta
    _require(isinstance(min_delta, (int, float)) and not isinstance(min_delta, bool) and min_delta >= 0,
             f"run.early_stop.min_delta must be a number >= 0, got {min_delta!r}.")
    _require(run.resume is None or isinstance(run.resume, str),
             f"run.resume must be a run directory or null, got {run.resume!r}.")
    for key in ("max_updates", "eval_every", "checkpoint_every"):
        value = run[key]
        _require(_is_int(value) and value >= 1,
                 f"run.{key} must be a positive integer, got {value!r} ({type(value).__name__}). "
                 f"Example: run.{key}=100.")
    for key, example in (("max_seconds", 3600), ("max_minibatches", 50000)):
        value = run.get(key)
        _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                 f"run.{key} must be a positive number or null, got {value!r}. Example: run.{key}={example}.")
    _require(run.device in ("auto", "cpu", "cuda"),
             f"run.device must be auto, cpu or cuda, got {run.device!r}.")
    _require(run.dtype in DTYPES, f"run.dtype must be one of {sorted(DTYPES)}, got {run.dtype!r}.")
    patience = run.early_stop.patience
    _require(patience is None or (_is_int(patience) and patience >= 1),
             f"run.early_stop.patience must be a positive integer or null, got {patience!r}.")
    threads = run.get("threads")
    _require(threads is None or (_is_int(threads) and threads >= 1),
             f"run.threads must be a positive integer or null (torch's default), got {threads!r}. "
             "Example: run.threads=1.")
    for key in ("flush_denormal", "stop_when_solved", "keep_freed_memory"):
        _require(isinstance(run.get(key, True), bool), f"run.{key} must be true or false, got {run.get(key)!r}.")
    timeout = run.get("collective_timeout_s", 600)
    _require(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
             f"run.collective_timeout_s must be a positive number of seconds, got {timeout!r}. "
             "Example: run.collective_timeout_s=600.")


def resolve_device(name: str) -> torch.device:
    """cpu or cuda; under torchrun with several processes, the GPU of this process's LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise HfrunError("run.device=cuda was asked for, but PyTorch sees no CUDA device here. "
                         "Use run.device=auto or run.device=cpu.")
    if name == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


# ---------------------------------------------------------------- building

def _without(cfg: DictConfig, *keys: str) -> DictConfig:
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in keys:
        container.pop(key, None)
    return OmegaConf.create(container)


def _instantiate(group: str, cfg: DictConfig, **kwargs):
    check_option_types(group, cfg)
    try:
        return instantiate(cfg, **kwargs)
    except Exception as error:  # instantiate wraps constructor errors; show the root cause
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, HfrunError):  # already one paragraph for the user (e.g. a missing data set)
            raise cause from None
        raise HfrunError(f"Could not build the {group} from its config ({type(cause).__name__}: {cause}). "
                         f"Check the {group}.* values you set (hfrun --cfg job shows the composed config).") from None


def build_task(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    return _instantiate("task", _without(cfg.task, "solver_hints"), seed=int(cfg.seed), device=device, dtype=dtype)


def build_model(cfg: DictConfig, task, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Fill the model config's `???` keys from what the task offers (task.model_sizes()), only those the
    model has: an MLP takes input_size, a CNN input_shape, both output_size."""
    offered = task.model_sizes()
    sizes = {key: value for key, value in offered.items() if key in cfg.model.keys()}
    for key, size in sizes.items():
        given = OmegaConf.select(cfg.model, key, default=None) if not OmegaConf.is_missing(cfg.model, key) else None
        _require(given is None or given == size or (isinstance(size, list) and list(given) == size),
                 f"model.{key}={given!r} was given, but it is filled in from the task ({task.name}: {size}). "
                 f"Drop the model.{key} override.")
    unfilled = [key for key in cfg.model if key not in sizes and OmegaConf.is_missing(cfg.model, key)]
    if unfilled:
        raise HfrunError(
             f"The model {cfg.model._target_} needs {', '.join(f'model.{key}' for key in unfilled)}, which the task "
             f"{task.name} does not supply (it offers {', '.join(sorted(offered))}). Drop the model=... override "
             f"to use the task's default model, or give the value: model.{unfilled[0]}=...")
    model_cfg = OmegaConf.merge(cfg.model, sizes)
    return _instantiate("model", model_cfg).to(device=device, dtype=dtype)


def check_model_fits_task(cfg: DictConfig, model: torch.nn.Module, task) -> None:
    """Run the model and the task's loss on two held-out cases before the first update, so that a model that
    does not take the task's inputs or give its outputs is named in one paragraph instead of failing in the
    middle of a solver."""
    batch = task.eval_batches()[0]
    inputs, targets = batch.inputs[:2], batch.targets[:2]
    mask = None if batch.mask is None else batch.mask[:2]
    try:
        with torch.no_grad():
            outputs = model(inputs)
            task.loss(outputs, targets, mask)
    except Exception as error:
        shown = f" and gave outputs of shape {tuple(outputs.shape)}" if "outputs" in locals() else ""
        raise HfrunError(
            f"The model {cfg.model._target_} does not fit the task {task.name}: it was given the task's inputs "
            f"of shape {tuple(inputs.shape)}{shown}, where the task's targets have shape {tuple(targets.shape)} "
            f"({type(error).__name__}: {error}). Drop the model=... override to use the task's default "
            "model, or pick a model for this kind of data: sequences of shape (batch, time, features) (the "
            "pathological tasks, seqmnist7) take model=rnn or model=lstm; images (batch, channels, height, width) "
            "take model=mlp, cnn, lenet5 or resnet; flat vectors (linreg, boston, sine) take model=linear or mlp."
        ) from None


def build_solver(cfg: DictConfig, model: torch.nn.Module, task):
    return _instantiate("solver", _without(cfg.solver, "name"), model=model, loss=task.loss)


# ---------------------------------------------------------------- state

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class _Absent:
    def __repr__(self) -> str:
        return "not set"


ABSENT = _Absent()


def _differing_leaves(saved, current, prefix: str):
    """(key, the run's value, the current value) for every leaf where the two plain configs differ; a key that
    one side lacks has ABSENT there."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            yield from _differing_leaves(saved.get(key, ABSENT), current.get(key, ABSENT), f"{prefix}.{key}")
    elif saved != current:
        yield prefix, saved, current


def _shell_word(text: str) -> str:
    """`text` as one shell word, readably: as it is, in double quotes, or (where those would not do) shlex's."""
    if shlex.quote(text) == text:
        return text
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)


def _run_value_override(key: str, saved, current) -> str | None:
    """`key=saved`, quoted for a shell, if Hydra reads it back as exactly the run's value; else None (also where
    either side lacks the key: a plain override cannot add or remove one)."""
    if saved is ABSENT or current is ABSENT or "${" in str(saved):  # ${...} would be resolved, not kept
        return None
    written = "null" if saved is None else saved
    for text in (f"{key}={written}", f"{key}='{written}'"):
        try:
            if OverridesParser.create().parse_override(text).value() == saved:
                return _shell_word(text)
        except Exception:  # noqa: BLE001 - Hydra's grammar refused it; try quoted, then give up
            continue
    return None


def _run_values(leaves: list[tuple]) -> list[str] | None:
    """Overrides that give the command the run's own values at every differing leaf (e.g. a default that changed
    since the run started); None where that cannot be said in overrides: a different task, model or solver
    altogether (its `_target_` or `name` differs), a key only one side has, or a value Hydra would not read back
    as itself."""
    if any(part in ("_target_", "name") for key, _, _ in leaves for part in key.split(".")):
        return None
    overrides = [_run_value_override(key, saved, current) for key, saved, current in leaves]
    return None if None in overrides else overrides


def _defaults_of_options_added_since(saved_group: dict, current_group: dict) -> dict:
    """{option: its constructor default} for the options the run's config lacks because hfrun gained them after
    the run started. An option is added with its constructor default equal to the behaviour before it existed,
    so a run that predates it ran with exactly that default."""
    try:
        parameters = inspect.signature(get_object(saved_group["_target_"])).parameters
    except Exception:  # an unknown or renamed target: no leniency, every difference is reported
        return {}
    return {key: parameters[key].default for key in current_group.keys() - saved_group.keys()
            if key in parameters and parameters[key].default is not inspect.Parameter.empty}


def _options_added_since(saved_group: dict, current_group: dict) -> set[str]:
    """Options added since the run started (above) that are set now to their default: the run may resume."""
    return {key for key, default in _defaults_of_options_added_since(saved_group, current_group).items()
            if default == current_group[key]}


def _resume_view(cfg: DictConfig, key: str, saved_group=None):
    """The part of the config under `key` that a resume must keep, as plain data. A task's solver_hints act only
    through the solver.* values they set, which are compared themselves."""
    value = _plain(cfg, key)
    if not isinstance(value, dict):
        return value
    value = {k: v for k, v in value.items() if k != "solver_hints"}
    if isinstance(saved_group, dict):
        for added in _options_added_since(saved_group, value):
            del value[added]
    return value


def check_resume_matches(saved_yaml: str, cfg: DictConfig, path: Path) -> None:
    saved = OmegaConf.create(saved_yaml)
    leaves, predating = [], []
    for key in RESUME_MUST_MATCH:
        saved_view = _resume_view(saved, key)
        current_view = _resume_view(cfg, key, saved_view)
        leaves += _differing_leaves(saved_view, current_view, key)
        if isinstance(saved_view, dict) and isinstance(current_view, dict):
            predating += [f"{key}.{option}={default}" for option, default
                          in sorted(_defaults_of_options_added_since(saved_view, current_view).items())]
    differences = [f"{key}={saved!r} in the run, {current!r} now" for key, saved, current in leaves]
    run_values = _run_values(leaves)
    if differences:
        hint = (f" The run predates an option it now differs in; it ran as {' '.join(predating)}, so add that "
                "to the command." if predating else
                f" To continue it with its own settings, add {' '.join(run_values)} to the command (a default "
                "may have changed since it started)." if run_values else "")
        raise HfrunError(f"The run in {path} was started with a different config than this command: "
                         f"{'; '.join(differences)}. Resume with the original task, model, solver, seed, dtype "
                         "and flush_denormal (the checkpoint holds them); only budgets such as run.max_updates "
                         f"may change.{hint}")


# ---------------------------------------------------------------- the loop

class Terminated(BaseException):
    """SIGTERM arrived: a scheduler's time limit, `kill`, or torchrun stopping every process of a
    data-parallel run because one of them failed."""


def _terminate(signum, frame):
    raise Terminated


class StopRequest:
    """First Ctrl-C asks the loop to stop after the current update and checkpoint; a second one aborts.
    SIGTERM aborts at once (a scheduler or torchrun sends SIGKILL soon after it), with a summary."""

    def __init__(self):
        self.requested = False
        self.previous = None
        self.previous_term = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.previous_term = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Interrupted: finishing this update and writing checkpoints/last.pt (Ctrl-C again to abort).")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            signal.signal(signal.SIGTERM, self.previous_term)
        return False


def _parameters_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def parallel_launcher_threads() -> int | None:
    """CPU threads for a job of a sweep whose launcher runs jobs side by side, where torch's default (every
    core, per job) would make them spin against each other (measured: two 2-thread runs on 2 cores each ran
    23× slower than alone):
      - hydra/launcher=joblib: the cores divided by n_jobs (all cores for n_jobs=-1), at least 1;
      - hydra/launcher=submitit_local or submitit_slurm: hydra.launcher.cpus_per_task (SLURM_CPUS_PER_TASK
        inside a SLURM job) where set; else 1 for the local executor, which starts every job at once.
    None otherwise (torch's default); run.threads, where set, wins over all of this."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    cores = os.cpu_count() or 1
    if "JoblibLauncher" in target:
        jobs = int(launcher.get("n_jobs") or 1)
        return max(1, cores // (cores if jobs < 0 else max(jobs, 1)))
    if "submitit_launcher" in target:
        cpus = launcher.get("cpus_per_task") or os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            return int(cpus)
        return 1 if "LocalLauncher" in target else None
    return None


class SilentLogger:
    """The logger of data-parallel processes other than rank 0, which write nothing."""

    def log_update(self, *args, **kwargs) -> None:
        pass

    def log_eval(self, *args, **kwargs) -> None:
        pass

    def close(self, summary: dict | None = None) -> None:
        pass


class Run:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        validate_run_config(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        adopt_submitit_environment()  # a submitit job of several tasks is one data-parallel run
        self.device = resolve_device(cfg.run.device)
        self.dtype = DTYPES[cfg.run.dtype]
        if self.device.type == "cpu":
            torch.set_flush_denormal(cfg.run.flush_denormal)
            if cfg.run.get("keep_freed_memory", True):
                keep_freed_memory()
        threads = cfg.run.get("threads")
        threads = parallel_launcher_threads() if threads is None else int(threads)
        if threads is not None:
            torch.set_num_threads(threads)
        if self.device.type == "cpu":
            record.info("device cpu, %d threads", torch.get_num_threads())
        self.parallel = from_environment(self.device, float(cfg.run.get("collective_timeout_s", 600)))
        if self.parallel.active:  # rank 0's directory is the run's; Hydra's ${now} differs between processes
            self.run_dir = Path(self.parallel.broadcast(str(self.run_dir)))
            record.info("data parallel: process %d of %d", self.parallel.rank, self.parallel.world_size)
        resume_state = self._load_resume_state()
        torch.manual_seed(int(cfg.seed))
        self.task = build_task(cfg, self.device, self.dtype)
        self.model = build_model(cfg, self.task, self.device, self.dtype)
        check_model_fits_task(cfg, self.model, self.task)
        self.solver = build_solver(cfg, self.model, self.task)
        self.stream = self.task.train_stream()
        if self.parallel.active:
            self.parallel.broadcast_parameters(self.model)
            try:
                self.solver.distribute(self.parallel)
            except ValueError as error:
                raise HfrunError(str(error)) from None
            self.stream = ShardedStream(self.stream, self.parallel)
        self.progress = Progress()
        self.score_key = cfg.run.early_stop.metric
        known = ["loss", self.task.metric_name]
        _require(self.score_key in known,
                 f"run.early_stop.metric={self.score_key!r} is not reported by task {self.task.name!r}; "
                 f"choose one of {sorted(set(known))}.")
        if resume_state is not None:
            self._restore(resume_state)
        self.checkpoint_dir = self.run_dir / "checkpoints"

    def _load_resume_state(self) -> dict | None:
        """The checkpoint to resume from, read by rank 0 and handed to the others (no shared disk needed)."""
        if self.cfg.run.resume is None:
            return None
        if not self.parallel.active:
            return self._read_resume_state()
        outcome = None
        if self.parallel.is_main:
            try:
                outcome = ("state", self._read_resume_state())
            except HfrunError as error:
                outcome = ("refused", str(error))
        kind, value = self.parallel.broadcast(outcome)
        if kind == "refused":
            raise HfrunError(value)
        return value

    def _read_resume_state(self) -> dict:
        path = Path(self.cfg.run.resume)
        state = load_checkpoint(path / "checkpoints" / "last.pt")
        try:
            check_resume_matches(state["config"], self.cfg, path)
        except HfrunError:
            raise
        except Exception as error:
            raise HfrunError(f"The checkpoint {path}/checkpoints/last.pt holds no readable config "
                             f"({type(error).__name__}: {error}): it is damaged. Resume from another run directory "
                             "or start afresh.") from None
        return state

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.solver.load_state_dict(state["solver"])
            self.stream.load_state_dict(state["stream"])
            self.progress = Progress(**state["progress"])
            counters = (self.progress.update, self.progress.examples_grad, self.progress.examples_curv)
            if not all(_is_int(value) and value >= 0 for value in counters):
                raise ValueError(f"counters {counters} are not non-negative integers")
            set_rng_state(state["rng"])
        except Exception as error:  # a damaged checkpoint or one this model's shapes do not match
            raise HfrunError(f"The checkpoint {self.cfg.run.resume}/checkpoints/last.pt does not fit this run "
                             f"({type(error).__name__}: {error}). It is damaged or from another model; resume "
                             "from another run directory or start afresh.") from None
        log.info("Resumed from update %d.", self.progress.update)

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "solver": self.solver.state_dict(),
                "stream": self.stream.state_dict(), "progress": asdict(self.progress), "rng": rng_state(),
                "config": OmegaConf.to_yaml(self.cfg)}

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        metrics = self.task.evaluate(self.model, self.parallel)
        self.model.train()
        return metrics

    def _save(self, name: str) -> None:
        """checkpoints/<name>.pt, written by rank 0 only, once every process is seen to hold the same
        parameters (they take the same decisions on the same all-reduced numbers; hfrun/distributed.py)."""
        if not self.parallel.agree(self.model):
            raise HfrunError(f"The {self.parallel.world_size} processes of this data-parallel run no longer hold "
                             f"the same parameters at update {self.progress.update}, so no checkpoint was written. "
                             "This is a bug in hfrun; please report it with the command. The last checkpoint "
                             "written, if any, is consistent.")
        if self.parallel.is_main:
            save_checkpoint(self._state(), self.checkpoint_dir / f"{name}.pt")

    def _minibatches(self, progress: Progress) -> float:
        """Minibatches so far in M&S 2011's unit: cases seen by gradients and curvature products over
        task.published_minibatch (1000; 32 for 5-bit memorization). run.max_minibatches counts these."""
        return (progress.examples_grad + progress.examples_curv) / self.task.published_minibatch

    def _budget_spent(self, progress: Progress) -> str | None:
        """Which budget binds, as the summary's message, or None: run.max_updates, run.max_seconds or
        run.max_minibatches (the last two may be null). Each counts the whole run, over resumes, and binds at the
        first update that reaches it."""
        run = self.cfg.run
        if progress.update >= run.max_updates:
            return f"run.max_updates={run.max_updates} reached."
        if run.max_seconds is not None and progress.wall_time_s >= run.max_seconds:
            return f"run.max_seconds={run.max_seconds:g} reached ({progress.wall_time_s:.0f} s)."
        minibatches = self._minibatches(progress)
        if run.get("max_minibatches") is not None and minibatches >= run.max_minibatches:
            return f"run.max_minibatches={run.max_minibatches:g} reached ({minibatches:.1f} minibatches)."
        return None

    def _record_solved(self, progress: Progress, metrics: dict[str, float]) -> bool:
        """Note the first evaluation at which the task's success criterion holds; True when it holds now."""
        if not self.task.is_solved(metrics):
            return False
        if not progress.solved_at:
            progress.solved_at = {"update": progress.update, "examples_grad": progress.examples_grad,
                                  "examples_curv": progress.examples_curv,
                                  "minibatches": self._minibatches(progress)}
        return True

    def _after_eval(self, metrics: dict[str, float]) -> str | None:
        """Record a scheduled evaluation; return a stop status (solved, early_stopped) or None."""
        p = self.progress
        p.last_eval, p.eval_update = dict(metrics), p.update
        score = metrics[self.score_key]
        if score < p.best_score - self.cfg.run.early_stop.min_delta:
            p.best_score, p.best_update, p.best_eval = score, p.update, dict(metrics)
            p.evals_without_improvement = 0
            self._save("best")
        else:
            p.evals_without_improvement += 1
        was_solved = bool(p.solved_at)
        if self._record_solved(p, metrics) and not was_solved and self.cfg.run.stop_when_solved:
            return "solved"
        patience = self.cfg.run.early_stop.patience
        if patience is not None and p.evals_without_improvement >= patience:
            return "early_stopped"
        return None

    def _final_progress(self, status: str, logger: RunLogger) -> tuple[Progress, str]:
        """The figures of the model the run stopped at: when it stopped between scheduled evaluations
        (run.max_seconds, Ctrl-C, a stall, max_updates off the schedule), evaluate it now.

        The result goes to the summary only, not into last.pt, whose progress stays that of the scheduled
        evaluations, so that a resumed run continues exactly as if it had never stopped. A success at this
        evaluation counts: the run is `solved`. best.pt and best_val_* stay the scheduled evaluations'
        (early stopping's record)."""
        p = self.progress
        if status in ("diverged", "error") or p.eval_update == p.update:
            return p, status
        final = copy.deepcopy(p)
        metrics = self._evaluate()
        logger.log_eval(p.update, metrics, final=True)
        final.last_eval, final.eval_update = dict(metrics), p.update
        if (self._record_solved(final, metrics) and self.cfg.run.stop_when_solved
                and status in ("budget", "interrupted", "stalled")):
            status = "solved"
        return final, status

    def train(self) -> dict:
        cfg, p = self.cfg, self.progress
        if self.parallel.is_main:
            logger = RunLogger(self.run_dir, OmegaConf.to_yaml(cfg), tensorboard=cfg.logger.tensorboard,
                               progress=cfg.logger.progress, max_updates=cfg.run.max_updates,
                               max_seconds=cfg.run.max_seconds, max_minibatches=cfg.run.get("max_minibatches"),
                               minibatch_size=self.task.published_minibatch,
                               start_update=p.update, start_seconds=p.wall_time_s,
                               metric_name=self.task.metric_name, start_counters=asdict(p),
                               hparams=hparams_of(OmegaConf.to_container(cfg, resolve=True)))
        else:
            logger = SilentLogger()
        status, message, final, summary = None, None, p, None
        started = time.monotonic() - p.wall_time_s
        try:
            try:
                with StopRequest() as stop:
                    if message := self._budget_spent(p):
                        status = "budget"
                    while status is None:
                        status, message = self._update(stop, logger, started)
                    if status != "diverged":
                        self._save("last")
                    final, status = self._final_progress(status, logger)
            except (KeyboardInterrupt, Terminated) as error:
                status = "interrupted"
                figures = (f"the final figures are those of the evaluation at update {p.eval_update}, not of the "
                           "model the run stopped at" if p.last_eval else "no evaluation had been made")
                cause = ("a second Ctrl-C" if isinstance(error, KeyboardInterrupt) else
                         "SIGTERM (a scheduler's time limit, a kill, or torchrun stopping every process because "
                         "one of them failed: see the other processes' messages)")
                message = f"Aborted by {cause} during update {p.update + 1}; {figures}. {self._resume_advice()}"
            except OutputError as error:
                status, message = "error", str(error) + " " + self._resume_advice()
            except Exception as error:
                if self.parallel.active and is_collective_failure(error):
                    message = self._collective_failure(error)
                    self._write_summary(p, "error", message)
                    raise HfrunError(message) from None
                self._write_summary(p, "error", f"{type(error).__name__}: {error}")
                raise
            summary = self._write_summary(final, status, message)
        finally:  # whatever happened: stop the progress line, close the files (the HParams entry with a summary)
            logger.close(summary)
        if status == "error":  # a file could not be written: the run cannot be trusted to have been saved
            print_summary(summary)
            raise OutputError(message)
        return summary

    def _collective_failure(self, error: Exception) -> str:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (f"Process {self.parallel.rank} of this {self.parallel.world_size}-process data-parallel run stopped "
                f"during update {self.progress.update + 1}: a collective operation failed ({type(error).__name__}: "
                f"{first_line}). Another "
                "process ended, was killed, or did not answer within run.collective_timeout_s="
                f"{self.cfg.run.get('collective_timeout_s', 600):g} s. Look at the other processes' messages for "
                f"the cause. {self._resume_advice()}")

    def _resume_advice(self) -> str:
        last = self.checkpoint_dir / "last.pt"
        if last.is_file():
            update = load_checkpoint(last)["progress"]["update"]
            return f"checkpoints/last.pt holds update {update}: run.resume={self.run_dir} continues from there."
        return "No checkpoints/last.pt had been written yet, so this run cannot be resumed: start it afresh."

    def _update(self, stop: StopRequest, logger: RunLogger, started: float) -> tuple[str | None, str | None]:
        """One solver update with its counting, logging, evaluation and checkpoint; (stop status, message)."""
        cfg, p = self.cfg, self.progress
        collective_seconds = self.parallel.collective_seconds
        try:
            stats = self.solver.step(self.stream)
        except FloatingPointError as error:  # e.g. CG met a NaN curvature product
            stats = {"loss": math.nan, "error": str(error)}
        if self.parallel.active:
            stats["time_collective_s"] = self.parallel.collective_seconds - collective_seconds
        if not math.isfinite(stats["loss"]) or not _parameters_finite(self.model):
            detail = f" ({stats['error']})" if "error" in stats else ""
            what = (f"The training loss became {stats['loss']}" if not math.isfinite(stats["loss"])
                    else "The parameters became NaN or infinite")
            return "diverged", (f"{what} at update {p.update + 1}{detail}: the "
                                "run diverged. No checkpoint was written for it; last.pt and best.pt, where "
                                "written, hold the last finite state. Lower the learning rate or raise the "
                                "damping and start again.")
        release_free_memory()  # what this update kept for reuse goes back to the OS between updates
        p.update += 1
        p.examples_grad += int(stats["examples_grad"])
        p.examples_curv += int(stats["examples_curv"])
        p.last_train_loss = stats["loss"]
        p.best_train_loss = min(p.best_train_loss, stats["loss"])
        p.wall_time_s = time.monotonic() - started
        logger.log_update(p.update, stats, asdict(p), p.wall_time_s)
        status, message = None, None
        if p.update % cfg.run.eval_every == 0:
            metrics = self._evaluate()
            logger.log_eval(p.update, metrics)
            status = self._after_eval(metrics)
        if status is None and stats.get("stalled"):
            status, message = "stalled", str(stats["stalled"])
        if status is None and (spent := self._budget_spent(p)):
            status, message = "budget", spent
        if status is None and stop.requested:
            status = "interrupted"
        if self.parallel.active:  # stop together: rank 0's clock and Ctrl-C decide for every process
            status, message = self.parallel.broadcast((status, message))
        if status is None and p.update % cfg.run.checkpoint_every == 0:
            self._save("last")
        return status, message

    def _write_summary(self, progress: Progress, status: str, message: str | None) -> dict:
        summary = self._summary(progress, status, message)
        if not self.parallel.is_main:
            return summary
        try:
            return write_summary(self.run_dir / "summary.json", summary)
        except OutputError as error:
            if status == "error":  # already failing on a write: report both, lose neither
                summary["message"] = f"{message} Writing summary.json failed as well: {error}"
                return summary
            raise

    def _summary(self, p: Progress, status: str, message: str | None) -> dict:
        cfg = self.cfg
        metric = self.task.metric_name
        summary = {
            "task": self.task.name, "solver": cfg.solver.name, "model": cfg.model._target_.rsplit(".", 1)[-1],
            "seed": int(cfg.seed), "status": status, "device": str(self.device), "dtype": cfg.run.dtype,
            "updates": p.update, "examples_grad": p.examples_grad, "examples_curv": p.examples_curv,
            # M&S 2011's unit: minibatches of task.published_minibatch cases (1000; 32 for 5-bit memorization)
            "minibatches": self._minibatches(p),
            "minibatch_size": self.task.published_minibatch,
            **({"task_protocol": self.task.protocol} if hasattr(self.task, "protocol") else {}),
            "wall_time_s": round(p.wall_time_s, 3),
            "metric": metric, "objective": self.score_key,
            # A figure never computed (no update, no evaluation yet) is None; a computed NaN stays NaN.
            "final_train_loss": p.last_train_loss if p.update else None,
            "best_train_loss": p.best_train_loss if p.update else None,
            "final_eval_update": p.eval_update if p.last_eval else None,
            "final_val_loss": p.last_eval.get("loss"), f"final_val_{metric}": p.last_eval.get(metric),
            "best_val_loss": p.best_eval.get("loss"), f"best_val_{metric}": p.best_eval.get(metric),
            "best_update": p.best_update if p.best_eval else None,
        }
        for key in [key for key in p.last_eval if key not in ("loss", metric)]:  # e.g. a classifier's accuracy
            summary[f"final_val_{key}"], summary[f"best_val_{key}"] = p.last_eval[key], p.best_eval.get(key)
        train_cases = getattr(self.task, "train_cases", None)
        if train_cases:  # a fixed data set: how many passes over it the gradients made
            summary["epochs"] = p.examples_grad / train_cases
        if self.task.success_threshold is not None:
            summary["solved"] = bool(p.solved_at)
            summary.update({f"solved_{key}": value for key, value in p.solved_at.items()})
        if status not in ("diverged", "error") and self.parallel.is_main:
            summary.update(self.task.final_report(self.model))
        if self.parallel.active:
            summary["processes"] = self.parallel.world_size
        if message:
            summary["message"] = message
        summary["run_dir"] = str(self.run_dir)
        return summary


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Build everything from the composed config, train, write summary.json; return the summary."""
    summary = Run(cfg, run_dir).train()
    print_summary(summary)
    return summary
