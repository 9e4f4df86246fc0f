"""Typed, frozen configuration for every stage, loaded from TOML.

Each stage owns one frozen dataclass section; :class:`Config` gathers them.
Every default is written out by :func:`dump_config`, and the resolved config
is saved next to every output with :func:`write_resolved_config`.

Loading is strict: an unknown key or a value of the wrong type is an error
that names the file and the key, because a silently ignored typo in a
threshold is how curation goes wrong without anyone noticing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

__all__ = [
    "AnatConfig",
    "Config",
    "ConfigError",
    "ExecutionConfig",
    "TemplatesConfig",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "from_dict",
    "load_config",
    "write_resolved_config",
]


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ExecutionConfig:
    """How the nipype graphs run.

    ``plugin`` is any nipype execution plugin (MultiProc, Linear, SLURM, SGE,
    PBS, ...); ``plugin_args`` are passed to it unchanged.
    """

    plugin: str = "MultiProc"
    nprocs: int = 1
    omp_nthreads: int = 1
    poll_sleep_duration: float = 0.05
    stop_on_first_crash: bool = False
    plugin_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplatesConfig:
    """Where MNI152NLin6Asym templates come from.

    The 2 mm templates ship inside the package. ``template_dir`` (a flat
    folder of ``MNI152NLin6Asym_res-<r>_...`` files or a TemplateFlow tree
    with a ``tpl-MNI152NLin6Asym`` folder) is searched first, and is required
    for 1 mm outputs.
    """

    template_dir: str = ""
    name: str = "MNI152NLin6Asym"


@dataclass(frozen=True)
class AnatConfig:
    """Anatomical preprocessing parameters."""

    skull_strip: Literal["deepbet", "template"] = "deepbet"
    output_resolutions: tuple[int, ...] = (2,)
    # Registration runs at this template resolution; 2 mm keeps it near 4 s.
    registration_resolution: int = 2
    registration_metric: Literal["mattes", "MI"] = "mattes"
    registration_iterations: tuple[int, ...] = (200, 100, 50)
    registration_shrink_factors: tuple[int, ...] = (4, 2, 1)
    registration_smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    registration_restarts: int = 1
    n4_shrink_factor: int = 2
    n4_iterations: tuple[int, ...] = (50, 50, 50, 50)
    n4_convergence: float = 1e-7
    deepbet_threshold: float = 0.5
    # Largest tolerated disagreement between qform and sform (mm of any corner
    # of the field of view) before we pick the sform and say so.
    qform_sform_tolerance_mm: float = 1.0
    modalities: tuple[str, ...] = ("T1w", "T2w", "FLAIR")


# --- stage sections are added above this line --------------------------------


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    anat: AnatConfig = field(default_factory=AnatConfig)


# --------------------------------------------------------------------------- machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Build the frozen dataclass ``cls`` from a plain mapping, strictly.

    Parameters
    ----------
    cls : type
        A dataclass type.
    data : dict
        Values; missing keys take the dataclass defaults.
    where : str
        Prefix used in error messages (file name and key path).

    Raises
    ------
    ConfigError
        On an unknown key or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists)."""
    return _plain(cfg)


def dump_config(cfg: Any) -> str:
    """TOML text with every value written out."""
    return tomli_w.dumps(config_to_dict(cfg))


def config_hash(cfg: Any) -> str:
    """Stable SHA-256 of a config (or a section), for rerun manifests."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load a TOML config, apply command-line overrides and return a :class:`Config`.

    Parameters
    ----------
    path : path-like, optional
        TOML file; ``None`` gives every default.
    overrides : dict, optional
        ``{section: {key: value}}`` applied on top of the file (the CLI flags).
    """
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        data[section] = {**data[section], **values}
    return from_dict(Config, data, where=where)


def write_resolved_config(cfg: Any, directory: str | Path, name: str = "neurocurate_config.toml") -> Path:
    """Write the resolved config next to a stage's outputs, atomically."""
    from pipeline.atomic import atomic_write_text

    target = Path(directory) / name
    atomic_write_text(target, dump_config(cfg))
    return target
