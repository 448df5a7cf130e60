"""Typed settings and the one key=value language they are written in.

Every setting a user passes goes through a :class:`Config`: a frozen dataclass whose fields are
type-checked (and range-checked where a field declares ``min`` / ``max``) on construction, with
did-you-mean errors for misspelt keys and a canonical ``key=value,...`` printing, so
``parse(to_spec(c)) == c``. Three kinds share it:

- :class:`MethodConfig`: a method's hyperparameters (never the table shape), written as a spec
  ``"method:key=value,..."``, so one config applies to every table of a model;
- :class:`FitConfig`: how a post hoc fit runs (``steps``, ``lr``, ``seed``, ...), one per method;
- ``embcompress.distill.DistillConfig``: the knowledge-distillation options.

    >>> from embcompress.config import parse_spec
    >>> cfg = parse_spec("dpq:variant=sx,groups=8,codewords=16")
    >>> parse_spec(cfg.to_spec()) == cfg
    True

Printing is canonical: every field, in declaration order, so a stored spec keeps its meaning
even if a default changes later.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

__all__ = ["Config", "MethodConfig", "FitConfig", "FitLike", "SpecError", "parse_spec", "split_spec", "to_spec",
           "config_fields"]

C = TypeVar("C", bound="Config")


class SpecError(ValueError):
    """A spec string or config value that cannot be used."""


@dataclass(frozen=True)
class Config:
    """Base of every typed settings dataclass.

    Subclasses declare fields with ``metadata={"help": ..., "min": ..., "max": ...}`` (bounds
    are optional and inclusive) and may override :meth:`validate` for constraints between fields.
    """

    #: Removed keys still accepted when parsing (dropped with a DeprecationWarning): key -> advice.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(self.describe(), f.name, value, hints[f.name])
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            _check_range(self.describe(), f, coerced)
        self.validate()

    @classmethod
    def describe(cls) -> str:
        """What error messages call these settings."""
        return cls.__name__

    def validate(self) -> None:
        """Check constraints between fields; raise :class:`SpecError` naming the field."""

    def to_spec(self) -> str:
        """Canonical ``key=value,...``: every field in declaration order."""
        return _format_items(self)

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value (JSON types), in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (unknown names are rejected with a suggestion)."""
        _check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for --help and documentation."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls: type[C], value: "C | str | Mapping[str, Any] | None" = None, **options: Any) -> C:
        """These settings from a config, a ``"key=value,..."`` string, a mapping or keywords.

        Keywords override the rest. A keyword or mapping value of None means the field's default
        (the old ``steps=None`` convention), except for fields that can hold None.

            >>> from embcompress.methods.pq import PQFit
            >>> PQFit.parse("iters=30").iters
            30
        """
        if isinstance(value, cls):
            base = value
        elif value is None:
            base = None
        elif isinstance(value, Config):
            raise SpecError(f"expected {cls.describe()} ({cls.__name__}), got a {type(value).__name__}")
        elif isinstance(value, str):
            base = cls(**_parse_items(cls, value, value))
        elif isinstance(value, Mapping):
            base = cls(**_keyword_values(cls, value))
        else:
            raise SpecError(f"{cls.describe()} must be a {cls.__name__}, a 'key=value,...' string or a dict, "
                            f"got {type(value).__name__}")
        changes = _keyword_values(cls, options)
        if base is None:
            return cls(**changes)
        return base.replace(**changes) if changes else base


@dataclass(frozen=True)
class MethodConfig(Config):
    """Base of every method's hyperparameter dataclass.

    Subclasses set ``method`` and declare fields with ``metadata={"help": ...}``; they may
    override :meth:`validate` for constraints between fields.
    """

    method: ClassVar[str] = ""

    @classmethod
    def describe(cls) -> str:
        return f"method {cls.method!r}"

    def to_spec(self) -> str:
        return to_spec(self)


@dataclass(frozen=True)
class FitConfig(Config):
    """Base of every method's post hoc fit settings (``from_pretrained(weight, spec, fit=...)``).

    ``steps`` is common to every method, so one setting can drive all the tables of a model
    (``compress_(model, ..., fit_options={"steps": 300})``); each method sets its default and says
    what a step is. Fields named ``seed`` that hold None are drawn from torch's global generator
    when the fit starts, and the drawn value is what the fitted table records.
    """

    method: ClassVar[str] = ""
    steps: int = field(default=0, metadata={"help": "unused: this method's fit is closed-form", "min": 0})

    @classmethod
    def describe(cls) -> str:
        return f"{cls.method} fit settings" if cls.method else "fit settings"


#: What ``fit=`` accepts: a method's fit config, a ``"key=value,..."`` string, a dict, or None (defaults).
FitLike = Union[FitConfig, str, Mapping[str, Any], None]


def config_fields(cls: type[Config]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(expected: Any) -> Any:
    """T for ``T | None`` (either spelling), else None."""
    if get_origin(expected) in (Union, types.UnionType):
        args = [a for a in get_args(expected) if a is not type(None)]
        if len(args) == 1 and len(get_args(expected)) == 2:
            return args[0]
    return None


def _coerce(where: str, name: str, value: Any, expected: Any) -> Any:
    """Check ``value`` against the field's declared type; ints are accepted for floats."""
    where = f"{where}: field {name!r}"
    inner = _optional_inner(expected)
    if inner is not None:
        return None if value is None else _coerce_plain(where, value, inner)
    return _coerce_plain(where, value, expected)


def _coerce_plain(where: str, value: Any, expected: Any) -> Any:
    if get_origin(expected) is Literal:
        choices = get_args(expected)
        if value not in choices:
            raise SpecError(f"{where} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where} must be a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise SpecError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {expected!r}")  # a bug in the config


def _check_range(where: str, f: dataclasses.Field[Any], value: Any) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f">= {low}" if high is None else f"<= {high}" if low is None else f"in {low}..{high}")
        raise SpecError(f"{where}: {f.name} must be {bounds}, got {value!r}")


def _check_keys(cls: type[Config], keys: Iterable[str]) -> None:
    valid = config_fields(cls)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            names = ", ".join(valid) if valid else "none"
            raise SpecError(f"unknown key {key!r} for {cls.describe()}; {hint}valid keys: {names}")


def _keyword_values(cls: type[Config], options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword settings checked by name; None stands for the default of a field that cannot be None."""
    options = _drop_retired(cls, options)
    _check_keys(cls, options)
    hints = _field_types(cls)
    return {k: v for k, v in options.items() if v is not None or _optional_inner(hints[k]) is not None}


def _drop_retired(cls: type[Config], values: Mapping[str, Any]) -> dict[str, Any]:
    kept = dict(values)
    for key in [k for k in kept if k in cls.RETIRED_KEYS]:
        warnings.warn(f"{cls.describe()}: {key!r} is no longer a setting here ({cls.RETIRED_KEYS[key]}); "
                      "ignored", DeprecationWarning, stacklevel=4)
        del kept[key]
    return kept


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _format_items(config: Config) -> str:
    return ",".join(f"{f.name}={_format_value(getattr(config, f.name))}" for f in dataclasses.fields(config))


def _parse_value(cls: type[Config], key: str, text: str) -> Any:
    expected = _field_types(cls)[key]
    inner = _optional_inner(expected)
    if inner is not None:
        if text.lower() == "none":
            return None
        expected = inner
    where = f"{cls.describe()}: {key}={text!r}"
    if get_origin(expected) is Literal:
        choices = get_args(expected)
        for choice in choices:
            if text == str(choice):
                return choice
        raise SpecError(f"{where} is not one of {', '.join(map(str, choices))}")
    if expected is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise SpecError(f"{where}: expected true or false")
    if expected is int:
        try:
            return int(text)
        except ValueError:
            raise SpecError(f"{where}: expected an integer") from None
    if expected is float:
        try:
            return float(text)
        except ValueError:
            raise SpecError(f"{where}: expected a number") from None
    return text


def _raw_items(text: str, spec: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> {k: v} as text, rejecting malformed and repeated items."""
    items: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"malformed item {item!r} in spec {spec!r}; expected key=value")
        if key in items:
            raise SpecError(f"key {key!r} is given twice in spec {spec!r}")
        items[key] = value.strip()
    return items


def _parse_items(cls: type[Config], text: str, spec: str) -> dict[str, Any]:
    items = _drop_retired(cls, _raw_items(text, spec))
    _check_keys(cls, items)
    return {key: _parse_value(cls, key, value) for key, value in items.items()}


def to_spec(config: MethodConfig) -> str:
    """Canonical spec string: ``method:key=value,...`` with every field in declaration order."""
    items = _format_items(config)
    return f"{config.method}:{items}" if items else config.method


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"method:key=value,..."`` -> (method, the typed values the string sets explicitly).

    Unknown methods and keys, malformed items and bad values are refused as in :func:`parse_spec`.

        >>> split_spec("dpq:groups=8")
        ('dpq', {'groups': 8})
    """
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string like 'dpq:groups=8', got {type(spec).__name__}")
    from .registry import get_method  # the registry imports configs; import late

    name, _, rest = spec.strip().partition(":")
    cls = get_method(name.strip()).Config
    return cls.method, _parse_items(cls, rest, spec)


def parse_spec(spec: "str | MethodConfig") -> MethodConfig:
    """Parse ``"method:key=value,..."`` into that method's config (a config passes through)."""
    if isinstance(spec, MethodConfig):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string like 'dpq:groups=8' or a config, got {type(spec).__name__}")
    from .registry import get_method

    method, values = split_spec(spec)
    return get_method(method).Config(**values)
