"""The method registry, filled by the :func:`register` decorator in each ``methods/`` file."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, TypeVar

from .config import MethodConfig, SpecError, parse_spec

if TYPE_CHECKING:
    from .base import CompressedEmbedding

__all__ = ["register", "get_method", "list_methods", "build"]

_METHODS: dict[str, type["CompressedEmbedding"]] = {}
T = TypeVar("T", bound="type[CompressedEmbedding[Any]]")


def register(cls: T) -> T:
    """Class decorator: make a :class:`CompressedEmbedding` subclass reachable by its config's name."""
    name = cls.Config.method
    if not name or name in _METHODS:
        raise ValueError(f"method name {name!r} is empty or registered twice")
    _METHODS[name] = cls
    return cls


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (importing registers every method)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _ensure_loaded()
    return sorted(_METHODS)


def get_method(name: str) -> type["CompressedEmbedding"]:
    _ensure_loaded()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(f"unknown method {name!r}; {hint}available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def build(
    spec: "str | MethodConfig",
    num_embeddings: int,
    embedding_dim: int,
    padding_idx: int | None = None,
) -> "CompressedEmbedding":
    """A randomly initialized compressed table, ready for end-to-end training.

    Example:
        >>> import torch
        >>> table = build("memcom:buckets=1000", 50_000, 64)
        >>> table(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 2, 64])
    """
    config = parse_spec(spec)
    return get_method(config.method)(num_embeddings, embedding_dim, config, padding_idx=padding_idx)
