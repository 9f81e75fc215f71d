"""Typed run configs: dataclasses filled from YAML plus dotted ``key=value`` overrides.

A config is a tree of dataclasses. :func:`load_config` reads a YAML file into it, applies
command-line overrides such as ``train.steps=40``, coerces every value to the type its field
declares, and refuses keys the tree does not have, naming the nearest valid one. The resolved
config is plain data (:func:`to_dict`) so it can be saved beside a run and inside checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io import atomic_write_text, read_regular_file

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20  # a run config is a few kB; anything near this is not one
MAX_CONFIG_NODES = 100_000  # values a YAML document may expand to, aliases counted at each use


class ConfigError(ValueError):
    """A config file or override that does not fit the config's schema."""


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 8, 8, 3


def short(value: Any) -> str:
    """``repr(value)`` cut to a line: an error message must not print a whole expanded value."""
    return _SHORT.repr(value)


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of the user's file ``path`` (a config): only a regular file of at most
    :data:`MAX_CONFIG_BYTES` is opened; anything else is one :class:`ConfigError` naming it."""
    data = read_regular_file(path, what, ConfigError, limit=MAX_CONFIG_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last
    silently) and a document whose aliases expand past :data:`MAX_CONFIG_NODES` values."""

    source = "the config"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"{self.source}: key {short(key)} appears twice (lines {seen[key]} and {line})")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, self.source)
        return node


def _expanded_size(root: yaml.Node, source: str) -> int:
    """The number of values ``root`` stands for once every alias is expanded (each node counted
    once per use), without expanding anything; :class:`ConfigError` past the budget or for an
    alias that contains itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to a value that contains it")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_CONFIG_NODES} values (YAML aliases used over and over?)"
            )
        sizes[key] = total
        return total

    return size(root) if root is not None else 0


def parse_yaml(text: str, source: str) -> Any:
    """``text`` read as YAML (safe types only) with :class:`_StrictLoader`'s limits; every problem
    is one :class:`ConfigError` naming ``source``."""
    loader = None
    try:
        loader = _StrictLoader(text)  # reads the text's characters already: may raise too
        loader.source = source
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file a user hands us (a DeepSpeed config): a regular UTF-8 file of bounded size whose
    keys appear once; every problem is one :class:`ConfigError` naming ``what`` and ``path``."""
    text = read_text(path, what)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{what} '{path}': key {short(key)} appears twice in one object")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} '{path}' is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what} '{path}': nested too deeply") from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=1)
    hint = ""
    if close:
        full = [v for v in valid if v.split(".")[-1] == close[0]]
        hint = f"; did you mean '{full[0]}'?"
    return ConfigError(f"unknown config key '{key}' in {where}{hint} (valid keys here: {', '.join(sorted(valid))})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the declared type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': cannot read {short(value)} as {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {short(value)}")
        return _from_dict(tp, value, key)
    if isinstance(value, str) and (origin in (list, tuple, dict) or tp in (list, tuple, dict)):
        # Overrides arrive as strings; YAML syntax lets `data.scale=[0.4,1.0]` through.
        value = parse_yaml(value, f"config key '{key}'")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {short(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {short(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {short(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"config key '{key}': expected an integer, got {short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {short(value)}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {short(value)}")
        return str(value)
    return value


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            prefix = f"{where}." if where else ""
            raise _unknown_key_error(f"{prefix}{key}", [f"{prefix}{k}" for k in types_], where or "the config")
    kwargs = {}
    for name, value in data.items():
        full = f"{where}.{name}" if where else name
        tp = types_[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # Sections merge into their defaults, so a YAML may set only some keys.
            base = to_dict(_default_of(cls, name))
            base.update(value)
            value = base
        kwargs[name] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field left unset
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _default_of(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return {}


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config tree; tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node, node_cls, path = tree, cls, []
    for i, part in enumerate(parts):
        types_ = _field_types(node_cls)
        if part not in types_:
            prefix = ".".join(path)
            valid = [f"{prefix}.{k}" if prefix else k for k in types_]
            raise _unknown_key_error(dotted, valid, f"override '{dotted}={raw}'")
        path.append(part)
        tp = types_[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"override '{dotted}={raw}': '{dotted}' is a section, set one of its keys")
            # Validated now (so the error names the override), stored as plain data like YAML values.
            node[part] = to_dict(_coerce(raw, tp, dotted))
        elif (tp is dict or typing.get_origin(tp) is dict) and i == len(parts) - 2:
            # One key inside a mapping field (model.overrides.depth=16), its value read as YAML reads it;
            # the field's own consumer (e.g. AIMConfig) validates the key.
            mapping = node.get(part)
            node[part] = {
                **(mapping if isinstance(mapping, dict) else {}),
                parts[-1]: parse_yaml(raw, f"override '{dotted}'"),
            }
            return
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"override '{dotted}={raw}': '{'.'.join(path)}' is not a section")
            node = node.setdefault(part, {})
            node_cls = tp


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """Split ``["a.b=1", ...]`` into pairs; a malformed item is a :class:`ConfigError`."""
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (for example train.steps=40)")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from defaults, then the YAML at ``path``, then dotted ``overrides``.

    Raises :class:`ConfigError` for a missing file, an unknown key (naming the nearest valid one)
    or a value that does not fit its field's type.
    """
    tree: dict[str, Any] = to_dict(cls()) if _all_defaults(cls) else {}
    if path is not None:
        p = Path(path)
        loaded = parse_yaml(read_text(p, "config file"), f"config file '{p}'") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
        _check_keys(cls, loaded, "", str(p))
        _merge(tree, loaded)
    for key, raw in parse_overrides(overrides or []):
        _set_dotted(tree, cls, key, raw)
    return _from_dict(cls, tree, "")


def _all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _check_keys(cls: type, data: dict[str, Any], prefix: str, source: str) -> None:
    types_ = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            valid = [f"{prefix}.{k}" if prefix else k for k in types_]
            raise _unknown_key_error(full, valid, f"'{source}'")
        if dataclasses.is_dataclass(types_[key]) and isinstance(value, dict):
            _check_keys(types_[key], value, full, source)


def _merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML, atomically (:mod:`aim_ds.io`)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
