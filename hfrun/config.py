"""Config helpers shared by the CLI and the tests: custom OmegaConf resolvers, the config path, and the
type check of every `_target_`'s options against its constructor's annotations."""
from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from hfrun.errors import HfrunError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _run_dir(resume, default):
    """A resumed run continues in its own directory; a new one gets the default."""
    return str(resume) if resume not in (None, "", "null") else default


def _hydra_subdir(resume, stamp):
    """Hydra's own record of the command; a resume keeps the original run's `.hydra` and adds its own."""
    return ".hydra" if resume in (None, "", "null") else f".hydra/resume_{stamp}"


def _by_protocol(protocol, release_value, hfrun_value):
    """A pathological task's setting that differs between its two definitions (task.protocol)."""
    return release_value if protocol == "release" else hfrun_value


def _at_least(value, threshold, then, otherwise):
    """`then` where the number `value` is at least `threshold`, else `otherwise` (also for an unset value)."""
    return then if isinstance(value, (int, float)) and value >= threshold else otherwise


def register_resolvers() -> None:
    for name, resolver in (("hfrun_run_dir", _run_dir), ("hfrun_hydra_subdir", _hydra_subdir),
                           ("hfrun_by_protocol", _by_protocol), ("hfrun_at_least", _at_least)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()  # on import: every reader of a run's saved config (resume, hfrun.evaluate, the report) needs them


# ---------------------------------------------------------------- option types

# What a value of each checked type looks like on the command line, for the message.
_EXAMPLES = {int: "10", float: "0.01", bool: "true", str: "name"}
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _accepts(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True  # types hfrun does not check here (tensors, dtypes, containers' items): the constructor does


def _checked_kinds(annotation) -> tuple[tuple, bool] | None:
    """(the plain types an annotation allows, whether None is allowed), or None when it is not checked."""
    if annotation in _NAMES:
        return (annotation,), False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        plain = tuple(m for m in members if m in _NAMES)
        if plain and len(plain) + (type(None) in members) == len(members):
            return plain, type(None) in members
    return None


def _sequence_of(annotation) -> tuple[type, int | None] | None:
    """(item type, fixed length or None) for list[int], Sequence[int], tuple[float, float], tuple[int, ...]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, collections.abc.Sequence) and len(args) == 1 and args[0] in _NAMES:
        return args[0], None
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis and args[0] in _NAMES:
            return args[0], None
        if len(set(args)) == 1 and args[0] in _NAMES:
            return args[0], len(args)
    return None


def _check_sequence(group: str, key: str, value, item: type, length: int | None, default) -> None:
    items = list(value) if isinstance(value, (ListConfig, list, tuple)) else None
    if items is not None and all(_accepts(item, v) for v in items) and (length is None or len(items) == length):
        return
    count = f"{length} " if length else ""
    example = list(default) if isinstance(default, (list, tuple)) else [_EXAMPLES[item]] * (length or 2)
    raise HfrunError(f"{group}.{key} must be a list of {count}{_NAMES[item].removeprefix('an ').removeprefix('a ')}"
                     f" values, got {value!r}. Example: {group}.{key}=[{','.join(map(str, example))}].")


def check_option_types(group: str, cfg: DictConfig) -> None:
    """Check each option of `cfg` against the annotation of the same-named argument of `cfg._target_`.

    One rule for every solver, model and task, instead of a hand check per key: a value of the wrong type
    (`solver.lr=abc`, `model.hidden_size=1.5`) stops the run with a message that names the key, the type
    wanted and an example. Unannotated arguments and container types are left to the constructor."""
    target = cfg.get("_target_") if isinstance(cfg, DictConfig) else None
    if not target:
        return
    try:
        constructor = get_object(target)
        hints = typing.get_type_hints(constructor.__init__ if inspect.isclass(constructor) else constructor)
        parameters = inspect.signature(constructor).parameters
    except Exception:  # an unknown target is reported by instantiate itself
        return
    for key, value in cfg.items():
        if key not in hints or isinstance(value, DictConfig):
            continue
        sequence = _sequence_of(hints[key])
        if sequence is not None:
            default = parameters[key].default if key in parameters else None
            _check_sequence(group, key, value, *sequence, default)
            continue
        checked = _checked_kinds(hints[key])
        if checked is None:
            continue
        kinds, none_allowed = checked
        if isinstance(value, ListConfig) or (value is None and none_allowed) or any(_accepts(kind, value) for kind in kinds):
            continue
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        example = (str(default).lower() if isinstance(default, bool) else str(default)) if (
            default is not inspect.Parameter.empty and default is not None) else _EXAMPLES[kinds[0]]
        wanted = " or ".join(_NAMES[kind] for kind in kinds) + (" or null" if none_allowed else "")
        raise HfrunError(f"{group}.{key} must be {wanted}, got {value!r} ({type(value).__name__}). "
                         f"Example: {group}.{key}={example}.")
