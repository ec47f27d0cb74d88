"""Command line and YAML loading for :mod:`megamoe.config`.

The parser is generated from the config dataclasses: one flag per field, grouped by section,
with the field's docstring as help. Values are applied in order: dataclass defaults, then
``--config FILE.yaml``, then flags given on the command line.

User mistakes raise :class:`ConfigError`, whose message is one line that names the flag or
key; :func:`exit_on_config_error` turns it into that line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Union

from megamoe.config import (FLAG_ALIASES, FLAG_SPELLINGS, MEGATRON_STRUCTURAL_FLAGS, SECTIONS, Config, ConfigError,
                            field_docs, flag_name, section_of)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """(a tool's own arguments, the training flags after ``--``): how tools that take training
    flags (``tools/plan_layout.py``, the benchmarks) read their command line."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """Turn a :class:`ConfigError` raised inside the block into one stderr line and exit 2."""
    try:
        yield
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Field types


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for ``Optional[X]`` / ``X | None``; else (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Check and convert a value from a config file to the field's declared type."""
    section = section_of(name)
    tp, optional = _unwrap_optional(_field_types(SECTIONS[section])[name])
    where = f"{origin}: '{name}'"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null ({flag_name(name)} needs a value)")
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} is {value!r}; {flag_name(name)} must be one of {list(choices)}")
        return value
    if typing.get_origin(tp) is list:
        element = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list ({flag_name(name)})")
        try:
            return [element(v) for v in value]
        except ValueError:
            raise ConfigError(f"{where}: {flag_name(name)} takes {element.__name__} values") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is {value!r}; {flag_name(name)} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} is {value!r}; {flag_name(name)} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} is {value!r}; {flag_name(name)} must be a number")
        return float(value)
    if tp is str:
        return str(value)
    raise AssertionError(f"config field {name} has an unsupported type {tp}")


# ---------------------------------------------------------------------------------------------
# Parser


_UNSET_WORDS = ("None", "none", "null")


def _value_parser(tp: Any, optional: bool):
    """argparse ``type`` for a field: its scalar type or one of its choices, plus ``None`` (the
    word unsets an optional field, e.g. a preset's shared experts)."""
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
    scalar = type(choices[0]) if choices else tp

    def parse(text: str) -> Any:
        if optional and text in _UNSET_WORDS:
            return None
        try:
            value = scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {scalar.__name__} value: {text!r}") from None
        if choices is not None and value not in choices:
            shown = ", ".join(map(str, choices + (("None",) if optional else ())))
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {shown})")
        return value

    parse.__name__ = scalar.__name__  # argparse names the type in its messages
    return parse


def _add_field(group: argparse._ArgumentGroup, name: str, tp: Any, default: Any, doc: str) -> None:
    flag = flag_name(name)
    doc = doc.replace("%", "%%")  # argparse %-formats help strings
    tp, optional = _unwrap_optional(tp)
    shown = "unset" if default is None else default
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    if tp is bool:
        if name.startswith("no_"):  # Megatron's negative switches (--no-load-optim) stay plain
            kwargs.update(action="store_true", help=doc)
        else:
            kwargs.update(action=argparse.BooleanOptionalAction, help=f"{doc} (default: {shown})")
    elif typing.get_origin(tp) is list:
        element = typing.get_args(tp)[0]
        kwargs.update(nargs="*" if element is int else "+", type=element, metavar=element.__name__.upper(),
                      help=f"{doc} (default: {shown})")
    else:
        if typing.get_origin(tp) is Literal:
            names = [str(c) for c in typing.get_args(tp)] + (["None"] if optional else [])
            metavar = "{" + ",".join(names) + "}"
        else:
            metavar = tp.__name__.upper() + ("|None" if optional else "")
        kwargs.update(type=_value_parser(tp, optional), metavar=metavar, help=f"{doc} (default: {shown})")
    group.add_argument(flag, *FLAG_SPELLINGS.get(name, ()), **kwargs)


def _add_aliases(group: argparse._ArgumentGroup, only: Optional[set[str]]) -> None:
    for flag, (name, value, doc) in FLAG_ALIASES.items():
        if only is None or name in only:
            group.add_argument(flag, dest=name, action="store_const", const=value, default=argparse.SUPPRESS,
                               help=f"{doc} (sets {flag_name(name)} {value})")


def build_parser(
    prog: str | None = None,
    description: str | None = None,
    sections: Iterable[str] = tuple(SECTIONS),
    with_config_file: bool = True,
    only: Optional[set[str]] = None,
) -> argparse.ArgumentParser:
    """A parser with one flag per field of the given config sections (or just the ``only`` fields)."""
    parser = _OneLineErrorParser(prog=prog, description=description, allow_abbrev=False)
    if with_config_file:
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            default=None,
            help="Load values from a YAML file (sections or flat field names); flags override it.",
        )
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} ({' '.join(cls.__doc__.split())})",
                                          MEGATRON_STRUCTURAL_FLAGS if section == "megatron" else None)
        docs = field_docs(cls)
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            assert f.name in docs, f"config field {cls.__name__}.{f.name} has no docstring"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            _add_field(group, f.name, hints[f.name], default, docs[f.name])
        if section == "megatron":
            _add_aliases(group, only)
    return parser


# ---------------------------------------------------------------------------------------------
# YAML


def load_yaml_values(path: str) -> dict[str, Any]:
    """Read a YAML config into {field name: value}. Accepts sections or flat keys."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{at}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections or fields")
    values: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        name = key.replace("-", "_")
        try:
            section_of(name)
        except KeyError:
            raise ConfigError(f"--config {path}: unknown key '{key}'") from None
        values[name] = _coerce(name, value, f"--config {path}")

    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"--config {path}: section '{key}' must be a mapping")
            for sub_key, sub_value in value.items():
                if section_of_or_none(sub_key.replace("-", "_")) not in (key, None):
                    raise ConfigError(f"--config {path}: '{sub_key}' belongs to section "
                                      f"'{section_of(sub_key.replace('-', '_'))}', not '{key}'")
                put(sub_key, sub_value)
        else:
            put(key, value)
    return values


def section_of_or_none(name: str) -> str | None:
    try:
        return section_of(name)
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------
# Entry points


def config_from_values(values: dict[str, Any]) -> Config:
    """A Config with the given fields set (other fields keep their defaults)."""
    config = Config()
    for name, value in values.items():
        setattr(getattr(config, section_of(name)), name, value)
    return config


def parse_values(
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
) -> dict[str, Any]:
    """Parse flags (and --config) into {field name: value}; command line wins over the file."""
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    values = load_yaml_values(config_file) if config_file else {}
    # A run's length is --train-iters or --train-samples: one given on the command line replaces
    # the other from the file (a preset's train_iters), as any flag overrides the file.
    for given, replaced in (("train_samples", "train_iters"), ("train_iters", "train_samples")):
        if args.get(given) is not None:
            values.pop(replaced, None)
    # a batch schedule's last batch is the global batch size (Megatron-LM: not both): one on the
    # command line replaces the file's global_batch_size
    if args.get("step_batch_size_schedule") is not None:
        values.pop("global_batch_size", None)
    values.update(args)
    if values.get("step_batch_size_schedule") is not None and values.get("global_batch_size") is not None:
        raise ConfigError(f"--step-batch-size-schedule {values['step_batch_size_schedule']!r} and --global-batch-size "
                          f"{values['global_batch_size']}: give one (the schedule's last batch is the global batch size)")
    if values.get("train_samples") is not None and "train_iters" in values:
        raise ConfigError(f"--train-iters {values['train_iters']} and --train-samples {values['train_samples']}: "
                          "give one (Megatron-LM's rule)")
    return values


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """Parse a full training configuration from the command line (unvalidated)."""
    parser = build_parser(prog=prog, description="Pretrain a Mixture-of-Experts language model.")
    return config_from_values(parse_values(argv, parser))
