"""Method configs and the one spec-string language.

A config is a frozen dataclass of hyperparameters only (never the table shape), so one config
applies to every table of a model. A spec string names a method and sets config fields:

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
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

__all__ = ["MethodConfig", "SpecError", "parse_spec", "to_spec", "config_fields"]


class SpecError(ValueError):
    """A spec string or config value that cannot be used."""


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyperparameter dataclass.

    Subclasses set ``method`` and declare fields with ``metadata={"help": ...}``; they may
    override :meth:`validate` for constraints between fields.
    """

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _field_types(type(self))[f.name]
            coerced = _coerce(self, f.name, value, expected)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Check constraints between fields; raise :class:`SpecError` naming the field."""

    def to_spec(self) -> str:
        return to_spec(self)

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with some fields changed (unknown names are rejected with a suggestion)."""
        _check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for --help and documentation."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def config_fields(cls: type[MethodConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(config: MethodConfig, name: str, value: Any, expected: Any) -> Any:
    """Check ``value`` against the field's declared type; ints are accepted for floats."""
    where = f"{config.method}: field {name!r}"
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


def _check_keys(cls: type[MethodConfig], keys: typing.Iterable[str]) -> None:
    valid = config_fields(cls)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(
                f"unknown key {key!r} for method {cls.method!r}; {hint}valid keys: {', '.join(valid)}"
            )


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_value(cls: type[MethodConfig], key: str, text: str) -> Any:
    expected = _field_types(cls)[key]
    where = f"{cls.method}: {key}={text!r}"
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


def to_spec(config: MethodConfig) -> str:
    """Canonical spec string: ``method:key=value,...`` with every field in declaration order."""
    parts = [f"{f.name}={_format_value(getattr(config, f.name))}" for f in dataclasses.fields(config)]
    return f"{config.method}:{','.join(parts)}" if parts else config.method


def parse_spec(spec: "str | MethodConfig") -> MethodConfig:
    """Parse ``"method:key=value,..."`` into that method's config (a config passes through)."""
    if isinstance(spec, MethodConfig):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string like 'dpq:groups=8' or a config, got {type(spec).__name__}")
    from .registry import get_method  # the registry imports configs; import late

    text = spec.strip()
    name, _, rest = text.partition(":")
    cls = get_method(name.strip()).Config
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"malformed item {item!r} in spec {spec!r}; expected key=value")
        _check_keys(cls, [key])
        if key in values:
            raise SpecError(f"key {key!r} is given twice in spec {spec!r}")
        values[key] = _parse_value(cls, key, value.strip())
    return cls(**values)
