"""What ships inside the package, found from anywhere (an installed wheel or a checkout): the configs by
name, and the folder this ``aim_ds`` was imported from (for the child processes it starts).

The files live in ``aim_ds/configs/``: pretraining and probe YAMLs in ``run/``, DeepSpeed engine
settings in ``deepspeed/``. The checkout's ``run/configs`` and ``ds_configs`` are symlinks to those
folders, so ``deepspeed run/pretrain.py --deepspeed ds_configs/zero3.json`` reads the same file that
``aim-pretrain --deepspeed zero3`` does, and git holds one copy.

:func:`resolve_config` is what every ``--config`` / ``--deepspeed`` goes through: a path that exists
wins; otherwise a bare name (``aim-0.6B``, ``probe_aim-tiny``, ``zero3``, with or without its suffix)
is looked up among the shipped files of that kind; anything else is a :class:`ConfigError` that lists
the shipped names.
"""

from __future__ import annotations

import os
import site
from importlib import resources
from pathlib import Path
from typing import Literal

from .config import ConfigError

Kind = Literal["run", "probe", "deepspeed"]

# kind -> (folder under aim_ds/configs, file suffix, what the option is called in messages)
_KINDS: dict[str, tuple[str, str, str]] = {
    "run": ("run", ".yaml", "pretraining config"),
    "probe": ("run", ".yaml", "probe config"),
    "deepspeed": ("deepspeed", ".json", "DeepSpeed config"),
}
PROBE_PREFIX = "probe_"


def configs_dir(kind: Kind) -> Path:
    """The folder of the shipped configs of ``kind`` (inside the installed package or the checkout).

    A wheel installs ``aim_ds`` as plain files, so the resource is a real directory and a path to it
    stays valid after this call (DeepSpeed and the probe subprocess open the file by path)."""
    folder = resources.files("aim_ds") / "configs" / _KINDS[kind][0]
    return Path(str(folder))


def shipped_names(kind: Kind) -> list[str]:
    """The names (file stems) of the shipped configs of ``kind``, sorted. Probe configs are the
    ``probe_*`` YAMLs; pretraining configs are the others."""
    suffix = _KINDS[kind][1]
    directory = configs_dir(kind)
    stems = sorted(p.stem for p in directory.iterdir() if p.suffix == suffix) if directory.is_dir() else []
    if kind == "deepspeed":
        return stems
    probe = kind == "probe"
    return [s for s in stems if s.startswith(PROBE_PREFIX) == probe]


def shipped_path(name: str, kind: Kind) -> Path | None:
    """The shipped file called ``name`` (its stem, or its file name with the suffix), or None."""
    suffix = _KINDS[kind][1]
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    if stem in shipped_names(kind):
        return configs_dir(kind) / f"{stem}{suffix}"
    return None


def resolve_config(value: str | os.PathLike, kind: Kind, option: str = "--config") -> str:
    """The file that ``value`` names: the path itself when it exists, else the shipped config of
    ``kind`` with that name. :class:`ConfigError` naming ``option`` and listing the shipped names
    otherwise (a path with a folder in it is never taken for a name: a mistyped path stays an error)."""
    text = os.fspath(value)
    if Path(text).exists():
        return text
    label = _KINDS[kind][2]
    names = ", ".join(shipped_names(kind)) or "none"
    if os.sep in text or (os.altsep and os.altsep in text):
        raise ConfigError(f"{option} {text}: no such {label} file (or give a shipped name: {names})")
    found = shipped_path(text, kind)
    if found is None:
        other = next((k for k in _KINDS if k != kind and shipped_path(text, k) is not None), None)  # type: ignore[arg-type]
        hint = f" ({text} is a shipped {_KINDS[other][2]})" if other else ""
        raise ConfigError(f"{option} {text}: neither a file nor a shipped {label}{hint}; shipped names: {names}")
    return str(found)


def package_parent() -> Path:
    """The folder holding the imported ``aim_ds`` package: a checkout's root, or ``site-packages``."""
    return Path(__file__).resolve().parents[1]


def child_pythonpath(current: str | None) -> str:
    """``PYTHONPATH`` for a child Python process that must import this same ``aim_ds`` (a checkout run
    without installing, e.g. ``python run/pretrain.py``): its parent folder first, unless it is a
    site-packages folder the child finds anyway (ahead of the standard library there, it could shadow
    a standard module)."""
    parent = package_parent()
    sites = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    parts = [p for p in (current or "").split(os.pathsep) if p]
    if parent not in sites and str(parent) not in parts:
        parts.insert(0, str(parent))
    return os.pathsep.join(parts)
