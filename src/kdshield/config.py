"""Config dataclasses -> command-line options and YAML files, from one definition.

Every method has one ``@dataclass`` config whose fields carry ``metadata={"help": ...}`` and whose
``__post_init__`` validates values with messages that name the field and the allowed range. This
module turns such a class into argparse options (``add_config_arguments``) and builds instances
from a YAML file plus command-line overrides (``build_config``), so there is no second list of
options anywhere.

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig, prefix="train")
    args = parser.parse_args(["--train.lr", "1e-3"])
    cfg = build_config(TrainConfig, yaml_section={"epochs": 3}, args=args, prefix="train")
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdshield.errors import ConfigError

T = TypeVar("T")


def cfg_field(default: Any = dataclasses.MISSING, *, help: str, choices: list | None = None, **kw):
    """A dataclass field with help text (and optional choices) for CLI and docs."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ConfigError naming the field when ``value`` is outside [lo, hi] (or open bounds), or is
    not a finite number (NaN compares false with everything, so it would pass any bound)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} is not a number: allowed {left}{lo_s}, {hi_s}{right}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name}={value!r} is not a finite number: give a number in {left}{lo_s}, {hi_s}{right}")
    bad = False
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bad = True
    if hi is not None and (value > hi or (hi_open and value == hi)):
        bad = True
    if bad:
        raise ConfigError(f"{name}={value!r} is out of range: allowed {left}{lo_s}, {hi_s}{right}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(choices)}")


def _resolve_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parse_int(text: str) -> int:
    s = str(text).strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        f = math.nan
    if math.isfinite(f) and f.is_integer():
        return int(f)
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")


def _parse_float(text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _parse_yaml(text: str) -> Any:
    """A YAML value (mappings like ``{neg: 0, pos: 1}``); malformed YAML is a usage error, not a traceback."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at character {mark.column + 1}" if mark is not None else ""
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid YAML ({problem}{where}); write a value like \"{{key: value, other: [a, b]}}\" "
            "with every bracket and quote closed") from None


def _is_mapping_type(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _converter(tp: Any):
    inner, optional = _base_type(tp)
    origin = typing.get_origin(inner)

    def none_or(fn):
        def conv(text):
            if optional and str(text).lower() in ("none", "null", ""):
                return None
            return fn(text)

        return conv

    if inner is bool:
        return none_or(_parse_bool)
    if inner is int:
        return none_or(_parse_int)
    if inner is float:
        return none_or(_parse_float)
    if inner is str:
        return none_or(str)
    if inner is Path:
        return none_or(Path)
    if origin in (list, tuple) or inner in (list, tuple):
        (elem,) = typing.get_args(inner)[:1] or (str,)
        elem_conv = _converter(elem)

        def to_list(text):
            if str(text).strip().startswith("["):  # a YAML list: [a, b]
                value = _parse_yaml(text)
                if not isinstance(value, list):
                    raise argparse.ArgumentTypeError(f"expected a list like [a, b], got {text!r}")
                return [elem_conv(v) if isinstance(v, str) else v for v in value]
            return [elem_conv(p.strip()) for p in str(text).split(",") if p.strip()]

        return none_or(to_list)
    if _is_mapping_type(inner):
        def to_mapping(text):
            value = _parse_yaml(text)
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a mapping like \"{{key: value}}\", got {text!r}")
            return value

        return none_or(to_mapping)
    return none_or(_parse_yaml)


# --- type checking of config values -----------------------------------------------------------

class _Mismatch(Exception):
    """A value does not fit a type hint; ``where`` is the position inside the value (``[2]``)."""

    def __init__(self, value: Any, tp: Any, where: str = "", reason: str = "", detail: str = "",
                 example: str | None = None):
        super().__init__(where)
        self.value, self.tp, self.where, self.reason = value, tp, where, reason
        self.detail, self.example = detail, example


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), Path: ("a path", "paths")}


def _describe(tp: Any, plural: bool = False) -> str:
    """``int | None`` -> 'an integer or null'; ``list[int]`` -> 'a list of integers'."""
    inner, optional = _base_type(tp)
    origin = typing.get_origin(inner)
    if inner in _NAMES:
        text = _NAMES[inner][1 if plural else 0]
    elif origin in (list, tuple) or inner in (list, tuple):
        args = typing.get_args(inner)
        text = ("lists" if plural else "a list") + (f" of {_describe(args[0], plural=True)}" if args else "")
    elif _is_mapping_type(inner):
        text = "mappings (key: value)" if plural else "a mapping (key: value)"
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(_describe(a, plural) for a in typing.get_args(inner) if a is not type(None))
    else:
        text = getattr(inner, "__name__", str(inner))
    return text + (" or null" if optional else "")


def _type_text(tp: Any) -> str:
    text = str(tp) if typing.get_origin(tp) is not None else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "").replace("pathlib.", "")


def _coerce(value: Any, tp: Any, where: str = "") -> Any:
    """``value`` checked against the type hint ``tp`` (and normalised: 2.0 -> 2 for an int, 3 -> 3.0
    for a float, a CLI-style string -> its type); raises _Mismatch."""
    if tp is Any or tp is object:
        return value
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise _Mismatch(value, tp, where)
    if isinstance(value, str) and inner not in (str, Path, Any):
        try:
            value = _converter(tp)(value)  # "1e-3" (PyYAML reads it as a string), "yes", "none", "0,1"
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            detail = str(err) if "YAML" in str(err) else ""
            raise _Mismatch(value, tp, where, detail=detail) from err
        if value is None:
            return None
    origin = typing.get_origin(inner)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(inner):
            try:
                return _coerce(value, arg, where)
            except _Mismatch:
                continue
        raise _Mismatch(value, tp, where)
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(value, tp, where)
    if inner is int:
        if isinstance(value, bool):
            raise _Mismatch(value, tp, where)
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch(value, tp, where)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch(value, tp, where)
        if not math.isfinite(float(value)):
            raise _Mismatch(value, tp, where, reason="a finite number")
        return float(value)
    if inner is str:
        if isinstance(value, str):
            return value
        quoted = f"'{value}' (quoted, a string)" if isinstance(value, (int, float)) and not where else None
        raise _Mismatch(value, tp, where, example=quoted)
    if inner is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch(value, tp, where)
    if origin in (list, tuple) or inner in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(value, tp, where)
        args = typing.get_args(inner)
        elem = args[0] if args else Any
        out = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if tuple in (origin, inner) else out
    if _is_mapping_type(inner):
        if not isinstance(value, dict):
            raise _Mismatch(value, tp, where)
        args = typing.get_args(inner)
        if len(args) == 2:
            return {k: _coerce(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
        return dict(value)
    if isinstance(inner, type) and not isinstance(value, inner):
        raise _Mismatch(value, tp, where)
    return value


def _example(tp: Any) -> Any:
    inner, _ = _base_type(tp)
    origin = typing.get_origin(inner)
    simple = {bool: True, int: 2, float: 0.5, str: "text", Path: "path/to/dir"}
    if inner in simple:
        return simple[inner]
    if origin in (list, tuple) or inner in (list, tuple):
        args = typing.get_args(inner)
        elem = _example(args[0]) if args else "a"
        return [elem, elem + 1] if isinstance(elem, (int, float)) and not isinstance(elem, bool) else [elem]
    if _is_mapping_type(inner):
        return {"key": "value"}
    return None


def _yaml_inline(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("...") else text


def check_field_value(cls: type, name: str, value: Any, *, prefix: str = "", hints: dict | None = None) -> Any:
    """``value`` for field ``name`` of config class ``cls``, checked against the field's type hint.

    int fields take integers (2.0 counts as 2, 1.5 does not; a bool is not an int), float fields take
    finite numbers (ints too), bool fields true/false, list fields a list of the element type,
    ``X | None`` also None, dict fields a mapping. Raises ConfigError naming the field, the value, the
    expected type and an example.
    """
    hints = hints if hints is not None else _resolve_types(cls)
    tp = hints.get(name, Any)
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    default = None
    if field is not None:
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if value is None and default is None and field.default is None:
            return None  # a field whose default is None takes None whatever its hint says
    try:
        return _coerce(value, tp)
    except _Mismatch as err:
        label = f"{prefix}.{name}" if prefix else name
        example = default
        try:
            if example is None or example in ([], {}, ""):
                raise _Mismatch(example, tp)
            _coerce(example, tp)
        except _Mismatch:
            example = _example(tp)
        expected = err.reason or _describe(err.tp)
        hint = f" ({_type_text(tp)})" if err.where == "" else f" (the field is {_type_text(tp)})"
        detail = f": {err.detail}" if err.detail else ""
        example_text = err.example or _yaml_inline(example)
        raise ConfigError(
            f"{label}{err.where}={err.value!r} ({type(err.value).__name__}) is not {expected}{hint}{detail}; "
            f"e.g. {name}: {example_text}") from None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--[prefix.]field`` option per dataclass field (default None = not given)."""
    hints = _resolve_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} options" + (f" (--{prefix}.*)" if prefix else ""))
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        flag = f"--{prefix + '.' if prefix else ''}{f.name.replace('_', '-')}"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" One of: {', '.join(map(str, choices))}."
        help_text += f" (default: {default})"
        group.add_argument(flag, dest=_dest(prefix, f.name), type=_converter(hints[f.name]),
                           default=None, help=help_text.replace("%", "%%"), metavar=f.name.upper())


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}__{name}" if prefix else name


def build_config(cls: type[T], yaml_section: dict | None = None, args: argparse.Namespace | None = None,
                 prefix: str = "", **overrides) -> T:
    """Instance of ``cls`` from defaults < YAML section < command-line options < keyword overrides.

    Unknown YAML keys are an error naming the key and the valid ones (typos must not pass silently).
    """
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = _resolve_types(cls)
    if yaml_section is not None and not isinstance(yaml_section, dict):
        raise ConfigError(f"the {prefix or cls.__name__} section must be a mapping of options (name: value), "
                          f"got {yaml_section!r} ({type(yaml_section).__name__})")
    for key, val in (yaml_section or {}).items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise ConfigError(f"unknown option {key!r} for {cls.__name__}{_did_you_mean(k, names)}; "
                              f"valid: {', '.join(sorted(names))}")
        values[k] = check_field_value(cls, k, val, prefix=prefix, hints=hints)
    if args is not None:
        for name in names:
            val = getattr(args, _dest(prefix, name), None)
            if val is not None:
                values[name] = check_field_value(cls, name, val, prefix=prefix, hints=hints)
    for key, val in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown option {key!r} for {cls.__name__}{_did_you_mean(key, names)}")
        if val is not None:
            values[key] = check_field_value(cls, key, val, prefix=prefix, hints=hints)
    return cls(**values)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict, with clear errors for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def config_to_dict(cfg: Any) -> dict:
    """JSON-friendly dict of a (possibly nested) config dataclass, for results records."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def parse_yaml_value(text: str, what: str) -> Any:
    """``text`` as a YAML value (``--set KEY=VALUE``'s VALUE); ConfigError naming ``what`` when it is
    not valid YAML, instead of a yaml traceback."""
    try:
        return _parse_yaml(text)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"{what}: {err}") from None
