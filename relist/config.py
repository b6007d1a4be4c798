"""Typed options: one system for every command, the cascade environment and the service.

A configuration is a dataclass with typed fields: ``int``, ``float``, ``str``, ``bool``, ``Path``,
``X | None``, ``tuple[X, ...]`` (a list) or another configuration dataclass (nested). Values reach it
three ways, all through ``from_mapping``, which checks each value against its field's type and names
the source and the key when one is wrong:

- YAML (``load_yaml``; ``--config FILE`` on every command): a mapping of field names; lists for tuple
  fields; a mapping for a nested configuration. Unknown keys, values of the wrong type (``epochs: "3"``,
  ``verify: "no"``) and YAML anchors or aliases are errors, never guessed at.
- The command line (``add_arguments`` and ``build``): field ``foo_bar`` is ``--foo-bar``, a positional
  field is an argument; a tuple field takes a comma-separated list; a nested field ``inner`` of ``outer``
  is ``--outer-inner``. Options on the command line win over the YAML file.
- Python: the dataclass itself.

Each field's ``metadata["help"]`` is its command-line help and ``metadata["choices"]`` (optional) the
values it accepts (each element's, for a list).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that does not fit its field; the message names where it came from."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field carrying its command-line help (and optionally ``choices`` and ``metavar``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("a list option's default must be a tuple")
    metadata = {"help": help, **kwargs}
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---- types ------------------------------------------------------------------------------------------------
def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {tp}")
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _element(tp: Any) -> Any | None:
    """``tuple[X, ...]`` -> X; None for anything that is not a list type."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        raise TypeError(f"unsupported option type {tp}: use tuple[X, ...]")
    return None


def _type_name(tp: Any) -> str:
    base, optional = _optional(tp)
    element = _element(base)
    name = f"a list of {_type_name(element)}" if element is not None else getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def _scalar(tp: Any, value: Any, where: str, from_text: bool) -> Any:
    """``value`` as a ``tp`` (int, float, str, bool or Path). Text from the command line is parsed; values
    from YAML or Python must already have the type (an int is accepted where a float is asked)."""
    if from_text and isinstance(value, str) and tp is not str:
        try:
            if tp is bool:
                value = {"true": True, "false": False, "1": True, "0": False}[value.strip().lower()]
            elif tp is Path:
                return Path(value)
            else:
                value = tp(value.strip())
        except (KeyError, ValueError):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is Path and isinstance(value, str):
        value = Path(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def convert(tp: Any, value: Any, where: str, from_text: bool = False) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; see the module docstring."""
    base, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_type_name(base)}, got null")
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {base.__name__} options, got {value!r}")
        return from_mapping(base, value, where)
    element = _element(base)
    if element is not None:
        if isinstance(value, str) and (from_text or _element(element) is None):
            value = [v.strip() for v in value.split(",") if v.strip()]
            from_text = True
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(base)}, got {value!r}")
        return tuple(convert(element, v, f"{where}[{k}]", from_text) for k, v in enumerate(value))
    return _scalar(base, value, where, from_text)


def _check_choices(f: dataclasses.Field, value: Any, where: str) -> None:
    choices = f.metadata.get("choices")
    if choices is None or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if v not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, choices))}")


def unflatten(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` with the keys of a flattened nested configuration moved under its field; a key given both
    ways is an error."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(values)
    for f in fields.values():
        if f.metadata.get("flatten"):
            inner = {g.name for g in dataclasses.fields(_optional(hints[f.name])[0])}
            moved = {k: values.pop(k) for k in list(values) if k in inner and k not in fields}
            if moved:
                nested = values.get(f.name, {})
                if not isinstance(nested, Mapping):
                    raise ConfigError(f"{source}: {f.name} must be a mapping of options")
                twice = sorted(set(nested) & set(moved))
                if twice:
                    raise ConfigError(f"{source}: {twice} given both at the top and under {f.name}")
                values[f.name] = {**nested, **moved}
    return values


def from_mapping(cls: type[T], values: Mapping[str, Any], source: str = "options") -> T:
    """A ``cls`` from a mapping of field names, every value checked; errors name ``source`` and the key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = unflatten(cls, values, source)
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        valid = sorted(set(fields) | {name for name, *_ in _flat_fields(cls)})
        raise ConfigError(f"{source}: unknown option(s) {unknown}; valid: {valid}")
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required option(s) {missing}")
    out = {}
    for name, value in values.items():
        where = f"{source}: {name}" if ":" not in source else f"{source}.{name}"
        out[name] = convert(hints[name], value, where)
        _check_choices(fields[name], out[name], where)
    try:
        return cls(**out)
    except ValueError as err:  # a configuration's own __post_init__ check
        raise ConfigError(f"{source}: {err}") from None


# ---- YAML -------------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without anchors or aliases (a few bytes of aliases can expand to gigabytes), without a key
    given twice, and with exponent floats such as ``1e-3`` read as numbers (plain PyYAML reads them as
    strings)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*name) are not accepted in configuration files")
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError(
                f"line {event.start_mark.line + 1}: anchors (&name) are not accepted in configuration files"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.YAMLError(f"line {node.start_mark.line + 1}: key(s) {repeated} given more than once")
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path) -> Any:
    """The YAML document at ``path`` (strict: see ``_StrictLoader``); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """A ``cls`` from the YAML mapping at ``path``, every value checked."""
    return from_mapping(cls, read_yaml(path) or {}, str(path))


def to_mapping(config: Any) -> dict:
    """A configuration as plain data (tuples as lists, paths as strings): what ``from_mapping`` reads back."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


# ---- the command line -------------------------------------------------------------------------------------
def _flat_fields(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> list[tuple[str, tuple, Any, Any]]:
    """(option name, path of field names, field, type) of every leaf field of ``cls``. A nested
    configuration's fields get its name as prefix (``outer__inner``), or none when the field's metadata
    says ``flatten`` (its options then read as the outer command's own)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, _ = _optional(hints[f.name])
        if dataclasses.is_dataclass(base):
            inner = prefix if f.metadata.get("flatten") else f"{prefix}{f.name}__"
            out += _flat_fields(base, inner, (*path, f.name))
        else:
            out.append((prefix + f.name, (*path, f.name), f, hints[f.name]))
    names = [name for name, *_ in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: a flattened configuration repeats an option name of its container")
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None or value == "" else str(value)


def _states_default(help_text: str) -> bool:
    """Whether a help text already says what an unset option means ("(default 500, ...)", "default: ...")."""
    return re.search(r"\(default[ :]", help_text) is not None


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """One option per leaf field of ``cls`` (see the module docstring), and ``--config FILE``."""
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="YAML file of option values (command-line wins)"
    )
    for dest, _, f, tp in _flat_fields(cls):
        base, _ = _optional(tp)
        element = _element(base)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        default = _default(f)
        if choices:
            help_text += f" (one of: {', '.join(map(str, choices))}{'; comma-separated' if element else ''})"
        if dest in positional:  # a tuple positional takes one or more words
            nargs = "+" if element else None
            parser.add_argument(dest, choices=choices, help=help_text, metavar=dest.upper(), nargs=nargs)
            continue
        flag = "--" + dest.replace("__", "-").replace("_", "-")
        if default is dataclasses.MISSING:
            help_text += " (required)"
        elif not (default is None and _states_default(help_text)):  # one default per option
            help_text += f" (default: {_shown(default)})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=dest, help=help_text)
            continue
        metavar = f.metadata.get("metavar") or (
            f"{getattr(element, '__name__', 'X').upper()},..." if element else base.__name__.upper()
        )
        parser.add_argument(flag, default=None, dest=dest, metavar=metavar, help=help_text)


def build(cls: type[T], args: argparse.Namespace, parser: argparse.ArgumentParser) -> T:
    """Merge YAML (``--config``) and command-line values into a ``cls``; errors go to ``parser.error``.

    Command-line text is parsed by each field's type (and its errors name the option); YAML values must
    already have it; an option on the command line wins over the file."""
    config_file = getattr(args, "config", None)
    source = f"--config {config_file}" if config_file is not None else "command line"
    try:
        values: dict[str, Any] = unflatten(cls, read_yaml(config_file) or {}, source) if config_file else {}
        missing = []
        for dest, (*outer, name), f, tp in _flat_fields(cls):
            flag = "--" + dest.replace("__", "-").replace("_", "-")
            given = getattr(args, dest, None)
            target: Any = values
            for part in outer:  # where the field lives; nothing is created for an option not given
                target = target.get(part) if isinstance(target, dict) else None
                if target is None:
                    break
            if given is not None:
                converted = convert(tp, given, flag, from_text=True)
                _check_choices(f, converted, flag)
                target = values
                for part in outer:
                    target = target.setdefault(part, {})
                    if not isinstance(target, dict):
                        raise ConfigError(f"{source}: {part} must be a mapping of options")
                target[name] = converted
            elif not outer and name not in values and _default(f) is dataclasses.MISSING:
                missing.append(flag)  # (a nested configuration's own required options: from_mapping says)
        if missing:
            raise ConfigError("missing required option(s): " + ", ".join(missing))
        return from_mapping(cls, values, source)
    except ConfigError as err:
        parser.error(str(err))
