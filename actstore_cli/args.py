"""Command-line flags generated from the stages' config dataclasses: one source of truth.

A field `batch_size: int = 64` documented by the string "Images per forward pass." under it becomes
`--batch-size N` with the help "Images per forward pass. (default 64)". Flags default to None, so
a flag overrides a TOML file (`--config`) only when it is given (`actstore.config.load_config`).
Field docstrings are read from the class source (they are not kept at run time).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from actstore.config import load_config
from actstore.errors import ConfigError

Command = Callable[[argparse.Namespace], int]
"""Runs a parsed subcommand; returns the exit status."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring written under it} for a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def layer_key(text: str) -> int | str:
    """A layer on the command line: a block index when it is an integer, else a layer name."""
    try:
        return int(text)
    except ValueError:
        return text


def json_object(text: str) -> dict[str, Any]:
    """A JSON object flag (storage options); a bad one is a one-line ConfigError, never echoed (it may hold keys)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"anon\": true}'")
    return value


def _flag_kwargs(hint: Any, default: Any, choices: Iterable[Any] | None) -> dict[str, Any]:
    """argparse keywords for one field type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if set(args) == {int, str}:
            return {"type": layer_key, "metavar": "L"}
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction if default is True else "store_true"}
    if origin is tuple:  # `--layers 8 10` and `--edit A --edit B` alike
        return {"nargs": "+", "action": "extend", "type": layer_key, "metavar": "L"}
    if origin in (dict, Mapping):
        return {"type": json_object, "metavar": "JSON"}
    if choices is not None:
        return {"type": hint, "choices": tuple(choices)}
    return {"type": hint, "metavar": {int: "N", float: "X"}.get(hint)}


def _shown(default: Any) -> str:
    """The default as the help text shows it; nothing for "unset" defaults (the docstring says what they mean)."""
    if default is dataclasses.MISSING or default is None or default is False or isinstance(default, Mapping):
        return ""
    return f" (default {' '.join(map(str, default)) if isinstance(default, tuple) else default})"


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (),
                     rename: Mapping[str, str] | None = None) -> None:
    """One flag per field of `cls` (but `skip`), with its docstring and default as help."""
    hints, docs, rename = typing.get_type_hints(cls), field_docs(cls), rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        parser.add_argument(flag, dest=f.name, default=None, help=docs.get(f.name, "") + _shown(f.default),
                            **_flag_kwargs(hints[f.name], f.default, f.metadata.get("choices")))


def add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="options from a TOML file; flags override it")


def config_from_args(cls: type, args: argparse.Namespace, command: str, extra: Mapping[str, Any] | None = None) -> Any:
    """`cls` from --config and the given flags; a required field missing from both is a one-line error."""
    fields = dataclasses.fields(cls)
    overrides = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    overrides.update(extra or {})
    path = getattr(args, "config", None)
    missing = [f.name for f in fields if overrides.get(f.name) is None
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing and not path:
        raise ConfigError(f"{command} needs " + ", ".join(f"--{m.replace('_', '-')}" for m in missing)
                          + (" (or --config FILE.toml)" if hasattr(args, "config") else ""))
    return load_config(cls, path, overrides)


def add_command(sub: Any, name: str, text: str, configure: Callable[[argparse.ArgumentParser], Command],
                chosen: str | None) -> None:
    """A subcommand with `text` as help. Its flags are added (by `configure`, which returns the function that runs
    it) only when it is the `chosen` one (None: all), so that `actstore serve` never imports torch."""
    p = sub.add_parser(name, help=text, description=text)
    # -v works after the command too; SUPPRESS keeps a -v given before it
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    if chosen is None or chosen == name:
        p.set_defaults(fn=configure(p))


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def flags_from(config: str, run: Command, *, config_file: bool = True,
               quiet: bool = True) -> Callable[[argparse.ArgumentParser], Command]:
    """A `configure` for add_command: the flags of the config class named "module:Class", imported only
    when the command is built, then --config FILE.toml and -q when asked."""
    def configure(parser: argparse.ArgumentParser) -> Command:
        module, _, name = config.partition(":")
        add_config_flags(parser, getattr(importlib.import_module(module), name))
        if config_file:
            add_config_file(parser)
        if quiet:
            add_quiet(parser)
        return run
    return configure
