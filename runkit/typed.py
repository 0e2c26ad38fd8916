"""Typed configs: one dataclass per job, from which the CLI flags, the YAML keys and search-space keys derive.

A config is a dataclass deriving from `TypedConfig` whose fields are declared with `option(...)`:

    @dataclass
    class FitConfig(TypedConfig):
        lr: float = option(1e-3, low=0, low_open=True, help="learning rate")
        mode: str = option("full", choices=("full", "linear"))

- `add_arguments(parser, FitConfig)` adds `--lr` and `--mode` (booleans get `--x/--no-x`);
- `FitConfig.from_dict(mapping, source)` validates every value (type, choices, range) and raises one
  `UserError` line naming the source and key; unknown keys are errors too;
- `check_value(FitConfig, key, value, source)` validates one value (a search-space constant or choice).

Flags, YAML values and space values all go through the same `coerce`, so a YAML value is checked exactly
like the flag would be. `parse_layered(parser, argv)` is runkit.config's layering (defaults, then
`--config FILE.yaml`, then flags) with that validation added for any argparse parser, typed or not: each
YAML value goes through its action's `type` and `choices` (bad value: exit 2, one line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runkit.errors import UserError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str = "", choices: Sequence | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           sep: str | None = None, check: Callable[[Any], str | None] | None = None,
           cli: bool = True, tune: bool = True, metavar: str | None = None) -> Any:
    """A config field. `low`/`high` bound numbers (and list items); `low_open` makes `low` exclusive;
    `sep` lets a list be given as one separated string ('a,b'); `check(value)` returns an error text or
    None; `cli=False` keeps it off the command line; `tune=False` keeps it out of search spaces."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "low": low, "high": high,
            "low_open": low_open, "sep": sep, "check": check, "cli": cli, "tune": tune, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- types


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_type(tp) -> tuple[Any, bool, bool]:
    """(scalar type, optional, is_list) of an annotation like `list[float] | None`."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return Any, optional, False
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return (args[0] if args else Any), optional, True
    return tp, optional, False


def _scalar(kind, value, name: str):
    """One scalar as `kind` with argparse-like conversions (a string '1e-3' is a float); else ValueError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, (bool, list, dict)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, (bool, list, dict)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, (bool, list, dict)) or value is None:
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def coerce(f: dataclasses.Field, tp, value: Any, *, ranges: bool = True) -> Any:
    """`value` as field `f` (annotation `tp`) wants it; ValueError with a one-line reason otherwise.
    `ranges=False` checks type and choices only (argparse's part; ranges follow in `from_dict`)."""
    kind, optional, is_list = _split_type(tp)
    meta = f.metadata if ranges else {**f.metadata, "low": None, "high": None, "check": None}
    name = f.name
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be set (no null)")
    if is_list:
        if isinstance(value, str) and meta.get("sep"):
            items = [v.strip() for v in value.split(meta["sep"]) if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, dict):
            raise ValueError(f"{name} must be a list, got {value!r}")
        else:
            items = [value]
        out = [_scalar(kind, v, name) for v in items]
        for v in out:
            _check_one(meta, name, v)
    else:
        out = _scalar(kind, value, name)
        _check_one(meta, name, out)
    if meta.get("check") is not None:
        problem = meta["check"](out)
        if problem:
            raise ValueError(f"{name}: {problem}")
    return out


def _check_one(meta: Mapping, name: str, v: Any) -> None:
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {v!r}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        lo, hi = meta.get("low"), meta.get("high")
        if lo is not None and (v < lo or (meta.get("low_open") and v == lo)):
            raise ValueError(f"{name} must be {'>' if meta.get('low_open') else '>='} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise ValueError(f"{name} must be <= {hi}, got {v!r}")


# ------------------------------------------------------------------------------------------ the base


class TypedConfig:
    """Mixin for config dataclasses: validation on construction, from_dict/to_dict, field lookup."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, coerce(f, hints[f.name], getattr(self, f.name)))
            except ValueError as exc:
                raise UserError(f"{type(self).__name__}: {exc}") from None
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override and raise UserError."""

    @classmethod
    def field_map(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def tunable_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("tune", True))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, source: str = "config", *,
                  none_is_default: bool = True):
        """Validate a mapping (YAML, a trial config, library callers): unknown keys and bad values are one
        UserError line. With `none_is_default`, None for a field that cannot be None means its default."""
        values = dict(values or {})
        fields = cls.field_map()
        unknown = sorted(str(k) for k in values if str(k).replace("-", "_") not in fields)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {unknown} (known: {', '.join(sorted(fields))})")
        hints = _hints(cls)
        kw = {}
        for k, v in values.items():
            key = str(k).replace("-", "_")
            if v is None and none_is_default and not _split_type(hints[key])[1]:
                continue
            try:
                kw[key] = coerce(fields[key], hints[key], v)
            except ValueError as exc:
                raise UserError(f"{source}: {exc}") from None
        try:
            return cls(**kw)
        except UserError as exc:
            raise UserError(f"{source}: {str(exc).split(': ', 1)[-1]}") from None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, source: str = "options"):
        fields = cls.field_map()
        return cls.from_dict({k: v for k, v in vars(ns).items() if k in fields}, source)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes}, type(self).__name__)


def check_value(cls, key: str, value: Any, source: str = "config") -> Any:
    """One value of `cls.key`, validated (UserError one line) and coerced."""
    fields = cls.field_map()
    if key not in fields:
        raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
    try:
        return coerce(fields[key], _hints(cls)[key], value)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None


# ------------------------------------------------------------------------------------------- argparse


class _Coerce:
    """argparse `type=` that runs the config's own type and choice checks (ranges and `check` follow in
    `from_dict`, as one UserError line, for flags and YAML alike)."""

    def __init__(self, f: dataclasses.Field, tp):
        self.f, self.tp = f, tp
        kind, _, _ = _split_type(tp)
        self.__name__ = getattr(kind, "__name__", "value")

    def __call__(self, text):
        kind, optional, is_list = _split_type(self.tp)
        try:
            if is_list and not self.f.metadata.get("sep"):
                value = _scalar(kind, text, self.f.name)  # nargs='+': one item per token
                _check_one({**self.f.metadata, "low": None, "high": None}, self.f.name, value)
                return value
            if optional and isinstance(text, str) and text.lower() in ("none", "null"):
                return None
            return coerce(self.f, self.tp, text, ranges=False)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: Sequence[str] = (),
                  defaults: Mapping[str, Any] | None = None) -> None:
    """Add one flag per CLI field of `cls`: `--name-with-dashes`, bools as `--x/--no-x`, lists nargs='+'."""
    hints = _hints(cls)
    defaults = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        tp = hints[f.name]
        kind, _, is_list = _split_type(tp)
        default = defaults.get(f.name, f.default if f.default is not _MISSING else
                               (f.default_factory() if f.default_factory is not _MISSING else None))
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help") or None
        if kind is bool and not is_list:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text, "type": _Coerce(f, tp)}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        elif f.metadata.get("choices") is not None:
            kw["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        if is_list and not f.metadata.get("sep"):
            kw["nargs"] = "+"
        parser.add_argument(flag, **kw)


def _action_value(action: argparse.Action, value: Any, key: str) -> Any:
    """A YAML value through an argparse action, as if it had been typed on the command line."""
    def convert(v):
        if action.type is json.loads:  # a JSON flag (e.g. pretrain's --genesis): YAML gives the parsed value
            return json.loads(v) if isinstance(v, str) else v
        if action.type is None:
            if isinstance(v, (bool, list, dict)) or v is None:
                raise ValueError(f"{key} must be a string, got {v!r}")
            return str(v)
        if isinstance(v, (bool, list, dict)) or v is None:
            raise ValueError(f"{key} must be a single value, got {v!r}")
        try:
            return action.type(str(v))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"{key}: invalid value {v!r} ({exc})" if str(exc) else
                             f"{key}: invalid value {v!r}") from None

    if isinstance(action.type, _Coerce):  # a typed config's flag: the field's full check, ranges included
        return coerce(action.type.f, action.type.tp, value)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")  # noqa: TRY004 - becomes a UserError
        return value  # the YAML states the value of the dest directly (store_false too)
    if isinstance(action, (argparse._StoreConstAction, argparse._CountAction, argparse._AppendAction)):
        return value
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    try:
        if many:
            items = value if isinstance(value, (list, tuple)) else [value]
            out = [convert(v) for v in items]
            if action.nargs == "+" and not out:
                raise ValueError(f"{key} needs at least one value")
        else:
            if isinstance(value, (list, tuple)):
                raise ValueError(f"{key} takes one value, got the list {value!r}")
            out = convert(value) if value is not None else None
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    if action.choices is not None:
        for v in out if many else [out]:
            if v is not None and v not in action.choices:
                raise ValueError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {v!r}")
    return out


def validate_yaml(parser: argparse.ArgumentParser, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """YAML keys -> {dest: value}, each value checked like its flag; unknown keys and bad values are
    one UserError line naming `source` and the key."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    out = {}
    for k, v in values.items():
        dest = str(k).replace("-", "_")
        if dest not in actions:
            raise UserError(f"{source}: unknown key {k!r} (known: {', '.join(sorted(actions))})")
        try:
            out[dest] = _action_value(actions[dest], v, str(k))
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None
    return out


def parse_layered(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """runkit.config.parse_layered with YAML values validated like flags (types, choices; exit 2, one line).

    Use it for any parser that defines `--config`; pretrain's can switch by changing its import."""
    from runkit.config import load_yaml

    pre, _ = parser.parse_known_args(argv)
    cfg_path = getattr(pre, "config", None)
    if cfg_path:
        parser.set_defaults(**validate_yaml(parser, load_yaml(cfg_path), str(Path(cfg_path))))
    return parser.parse_args(argv)
