"""Typed command configuration: a dataclass per command, loadable from YAML, overridable on the CLI.

Each field's ``metadata["help"]`` is its command-line help. Field ``foo_bar`` is option
``--foo-bar``; a field named in ``positional`` is a positional argument. ``--config FILE`` reads a YAML
mapping of field names first; options given on the command line win. An unknown key in the YAML
file or a misspelt option is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field carrying its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _base_type(tp: Any) -> Any:
    """Unwrap ``X | None`` to ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of option values (command-line options win)"
    )
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if f.name in positional:
            parser.add_argument(f.name, type=tp, choices=choices, help=help_text, metavar=f.name.upper())
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f"{help_text} (default: {default})"
            )
        else:
            shown = "required" if required else f"default: {default}"
            parser.add_argument(
                flag,
                type=tp,
                choices=choices,
                default=None,
                dest=f.name,
                metavar=f.metadata.get("metavar", tp.__name__.upper()),
                help=f"{help_text} ({shown})",
            )


def build(cls: type[T], args: argparse.Namespace, parser: argparse.ArgumentParser) -> T:
    """Merge YAML (if ``--config``) and command-line values into a ``cls`` instance."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            parser.error(f"--config {args.config}: {err}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {args.config}: expected a mapping of option names to values")
        unknown = sorted(set(loaded) - names)
        if unknown:
            parser.error(f"--config {args.config}: unknown option(s) {unknown}; valid: {sorted(names)}")
        values.update(loaded)
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        parser.error("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**values)
