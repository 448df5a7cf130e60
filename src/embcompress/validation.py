"""Input checks shared by every table: clear errors that name the problem and a valid alternative."""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch

__all__ = ["check_ids", "check_bag", "check_weight", "check_table_shape", "normalize_padding_idx", "json_int",
           "json_choice", "json_int_list", "json_object", "MAX_ROWS", "MAX_DIM"]

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                   torch.uint16, torch.uint32, torch.uint64)
# Unsigned types past uint8 have few CPU kernels (no min/max): their range check runs on an int64 copy.
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
_BAG_MODES = ("sum", "mean", "max")


def check_ids(ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Validate lookup ids like ``nn.Embedding`` would, with a more useful message."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of integers, got {type(ids).__name__}; "
                        "wrap them with torch.as_tensor(ids, dtype=torch.long)")
    if ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"ids must have an integer dtype, got {ids.dtype}; "
                        "convert with ids.long() (float ids are not rounded silently)")
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        # Graph capture (jit.trace, torch.export, ONNX): a data-dependent Python branch would be
        # frozen at capture time, so the range check stays out of the graph; the gathers of the
        # exported graph still reject out-of-range ids at run time.
        return ids
    if ids.numel():
        signed = ids.long() if ids.dtype in _WIDE_UNSIGNED else ids
        lo, hi = (int(v) for v in torch.aminmax(signed))  # one pass over the ids, not two
        if lo < 0 and ids.dtype == torch.uint64:  # past 2**63: wrapped negative by the int64 copy
            raise IndexError(f"id {lo + 2 ** 64} is out of range for a table of {num_embeddings} rows; "
                             f"valid ids are 0..{num_embeddings - 1}")
        if lo < 0:
            raise IndexError(f"negative id {lo}: ids must lie in [0, {num_embeddings - 1}]")
        if hi >= num_embeddings:
            raise IndexError(f"id {hi} is out of range for a table of {num_embeddings} rows; "
                             f"valid ids are 0..{num_embeddings - 1}")
    return ids


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """A finite 2-D float matrix as float32, or a clear error."""
    if not isinstance(weight, torch.Tensor):
        try:
            import numpy as np

            weight = torch.from_numpy(np.asarray(weight))
        except Exception as exc:  # noqa: BLE001 - report what was passed
            raise TypeError(f"{name} must be a 2-D tensor or array, got {type(weight).__name__}") from exc
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x dim), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {weight.dtype}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(weight.shape)}")
    peak = float(weight.detach().abs().max()) if weight.dtype == torch.float64 else 0.0
    if peak > torch.finfo(torch.float32).max and math.isfinite(peak):
        raise ValueError(f"{name} has values up to {peak:.3g}, beyond float32's range "
                         f"(+-{torch.finfo(torch.float32).max:.3g}); divide the table by a constant first")
    weight = weight.detach().to(torch.float32)
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise ValueError(f"{name} has {count} NaN or infinite values (first at row {bad[0]}, "
                         f"column {bad[1]}); clean or drop those rows before compressing")
    return weight.contiguous()


def check_table_shape(num_embeddings: int, embedding_dim: int) -> None:
    for label, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """Same rules as ``nn.Embedding``: negative counts from the end."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx {padding_idx} must be within [-{num_embeddings}, {num_embeddings - 1}]")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def check_bag(ids: torch.Tensor, offsets: torch.Tensor | None, per_sample_weights: torch.Tensor | None, mode: str,
              num_embeddings: int, include_last_offset: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``nn.EmbeddingBag``'s argument rules, checked up front for every format and both lookup paths.

    Returns (ids as 1-D int64, offsets as 1-D int64 bag starts, per_sample_weights 1-D float32 or None).
    Stricter than ``nn.EmbeddingBag`` where it silently returns wrong bags: negative or decreasing
    offsets are refused too.
    """
    if mode not in _BAG_MODES:
        raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
    check_ids(ids, num_embeddings)
    if ids.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when ids is 2-D (B, L); pass 1-D ids to use offsets")
        batch, length = ids.shape
        # (B, 0) ids are B empty bags (zeros); nn.EmbeddingBag fails on them with "step must be nonzero".
        offsets = torch.arange(batch, dtype=torch.long, device=ids.device) * length
        include_last_offset = False
    elif ids.dim() != 1 or offsets is None:
        raise ValueError(f"ids must be 2-D (B, L), or 1-D together with offsets; got shape {tuple(ids.shape)}"
                         f"{'' if offsets is not None or ids.dim() != 1 else ' without offsets'}")
    else:
        if not isinstance(offsets, torch.Tensor) or offsets.is_floating_point() or offsets.is_complex() \
                or offsets.dtype == torch.bool:
            kind = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
            raise TypeError(f"offsets must be an integer tensor of bag starts, got {kind}; "
                            "use torch.tensor([...], dtype=torch.long)")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D (one start per bag), got shape {tuple(offsets.shape)}")
        offsets = offsets.long()
        count = ids.shape[0]
        if offsets.numel() and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            first, last = int(offsets[0]), int(offsets[-1])
            decreasing = bool((offsets[1:] < offsets[:-1]).any())
            if first != 0 or decreasing or last > count or (include_last_offset and last != count):
                end = f"exactly the number of ids ({count}) last" if include_last_offset else \
                    f"at most the number of ids ({count})"
                shown = ", ".join(str(v) for v in offsets[:8].tolist())
                raise ValueError(f"offsets must be the bags' starting positions: 0 first, never decreasing, {end}; "
                                 f"got [{shown}{', ...' if offsets.numel() > 8 else ''}]")
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"per_sample_weights work with mode='sum' only (as in nn.EmbeddingBag), got "
                             f"mode={mode!r}")
        if not isinstance(per_sample_weights, torch.Tensor) or not per_sample_weights.is_floating_point():
            kind = per_sample_weights.dtype if isinstance(per_sample_weights, torch.Tensor) else \
                type(per_sample_weights).__name__
            raise TypeError(f"per_sample_weights must be a floating-point tensor, got {kind}; convert with .float()")
        if per_sample_weights.shape != ids.shape:
            raise ValueError(f"per_sample_weights must have the shape of ids {tuple(ids.shape)}, got "
                             f"{tuple(per_sample_weights.shape)}")
        per_sample_weights = per_sample_weights.reshape(-1).float()
    return ids.reshape(-1).long(), offsets, per_sample_weights


# -- values read from a stored JSON header -------------------------------------------------------
# A header is data from a file: every value is checked for its JSON type and range before it
# builds anything, so a float where an int belongs (1.0 passes ``==`` and dict lookups in
# Python, but not the C kernels) or an absurd size is refused instead of half-working.
MAX_ROWS = 1 << 40  # ids stay far inside int64 arithmetic (id * books * bits, a * id + b)
MAX_DIM = 1 << 24


@overload
def json_int(mapping: dict, key: str, lo: int, hi: int, *, optional: Literal[False] = False) -> int: ...
@overload
def json_int(mapping: dict, key: str, lo: int, hi: int, *, optional: bool) -> int | None: ...
def json_int(mapping: dict, key: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
    """``mapping[key]`` as an int in [lo, hi] (a JSON integer, never a bool or a float)."""
    if key not in mapping or (optional and mapping[key] is None):
        if optional:
            return None
        raise ValueError(f"{key} is missing")
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise ValueError(f"{key}={value} is out of range [{lo}, {hi}]")
    return value


def json_choice(mapping: dict, key: str, choices: "tuple | list | dict", *, optional: bool = False) -> Any:
    """``mapping[key]`` as one of ``choices`` (compared with its type: 8.0 is not 8)."""
    if key not in mapping:
        if optional:
            return None
        raise ValueError(f"{key} is missing")
    value = mapping[key]
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def json_int_list(mapping: dict, key: str, lo: int, hi: int, *, min_len: int = 1, max_len: int = 64) -> list[int]:
    """``mapping[key]`` as a list of ints in [lo, hi]."""
    value = mapping.get(key)
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise ValueError(f"{key} must be a list of {min_len} to {max_len} integers, got {value!r}")
    return [json_int({key: v}, key, lo, hi) for v in value]


def json_object(mapping: dict, key: str, *, optional: bool = False) -> dict | None:
    """``mapping[key]`` as a JSON object (a dict), or None when optional and absent."""
    value = mapping.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value
