"""Dispatch to the fused C kernels (``embcompress._kernels``), with torch's path as the fallback.

The lookups of the frozen formats (codebook, hashed, tt, factors) and two training hot spots
(DPQ-SX's scores/softmax and the codebook gradient of bag sums) have C versions. The extension is
optional: it is built at install time when a C compiler is present. Callers ask :func:`usable`
first; the torch path runs instead when the extension is missing or turned off
(``EMBCOMPRESS_KERNELS=0`` or :func:`set_enabled`), while a graph is being captured (TorchScript,
``torch.export``, ``torch.compile``, ONNX keep plain torch ops), and for tensors not on the CPU.
Both paths give the same numbers: bit for bit where no sum is reordered, within float rounding
otherwise (tests/test_kernels.py). The wrappers here check every shape the C code relies on.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..hashing import PRIME, HashFunction

try:
    from .. import _kernels
except ImportError:  # built without a C compiler: the torch path serves every lookup
    _kernels = None

__all__ = ["available", "enabled", "set_enabled", "usable", "Bags", "codebook_lookup", "hashed_lookup", "tt_lookup",
           "factors_lookup", "bag_sum_backward", "dpq_supported", "dpq_sx_forward", "dpq_sx_backward", "dpq_vq_stats",
           "dpq_vq_codes"]

_OFF_WORDS = ("0", "false", "no", "off")
_ON_WORDS = ("", "1", "true", "yes", "on")


def _enabled_from_environment(value: str | None) -> bool:
    """EMBCOMPRESS_KERNELS read as a switch: 0/false/no/off turn the C lookups off, 1/true/yes/on
    (or unset) leave them on; anything else warns and leaves them on."""
    word = (value or "").strip().lower()
    if word in _OFF_WORDS:
        return False
    if word not in _ON_WORDS:
        warnings.warn(f"EMBCOMPRESS_KERNELS={value!r} is not a switch; the C kernels stay on "
                      f"(use one of {', '.join(_OFF_WORDS[:2])} to turn them off, 1 to keep them)", stacklevel=2)
    return True


_enabled = _enabled_from_environment(os.environ.get("EMBCOMPRESS_KERNELS"))
# Shape limits of the C kernels (read from the extension; past them the torch path runs):
TT_MAX_ROW = getattr(_kernels, "TT_MAX_ROW", 0)  # floats of a transposed tt row on the kernel's stack
DPQ_MAX_CODEWORDS = getattr(_kernels, "DPQ_MAX_CODEWORDS", 0)
DPQ_MAX_WIDTH = getattr(_kernels, "DPQ_MAX_WIDTH", 0)
DPQ_MAX_PAIRS = getattr(_kernels, "DPQ_MAX_PAIRS", 0)  # codewords x group width


def available() -> bool:
    """True if the C extension was built and imports."""
    return _kernels is not None


def enabled() -> bool:
    """True if lookups will use the C extension where they can."""
    return _kernels is not None and _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the C lookups on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def usable(*tensors: torch.Tensor | None) -> bool:
    """True if a lookup over these tensors may run in C (eager mode, CPU, extension on)."""
    if not (_enabled and _kernels is not None):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _address(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    if tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"kernel input must be contiguous {dtype}, got {tensor.dtype} "
                         f"({'contiguous' if tensor.is_contiguous() else 'strided'})")
    return tensor.data_ptr()


def codebook_lookup(ids: torch.Tensor, num_embeddings: int, packed: torch.Tensor, row_bits: int, slot_bits: int,
                    offsets: torch.Tensor, table: torch.Tensor, combine: str, bags: "Bags | None" = None
                    ) -> torch.Tensor:
    """Rows of ids (N,) int64 decoded from packed uint8 codes against table (rows, width) float32.

    Row r's slot s is the ``slot_bits``-bit field at bit ``r * row_bits + s * slot_bits`` of
    ``packed``; it indexes ``table`` at ``field + offsets[s]``. ``combine`` "concat" lays the slots'
    table rows side by side, "sum" adds them. With ``bags``, the pooled bags (B, d) instead.
    """
    if combine not in ("concat", "sum"):
        raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
    if offsets.dim() != 1 or table.dim() != 2:
        raise ValueError(f"offsets must be (slots,) and table (rows, width), got {tuple(offsets.shape)} and "
                         f"{tuple(table.shape)}")
    slots, width = offsets.shape[0], table.shape[1]
    dim = width if combine == "sum" else slots * width
    out = torch.empty(ids.shape[0] if bags is None else bags.count, dim)
    _kernels.codebook_lookup(_address(ids, torch.int64), ids.shape[0], num_embeddings,
                             _address(packed, torch.uint8), packed.numel(), row_bits, slot_bits, slots,
                             _address(offsets, torch.int32), _address(table, torch.float32), table.shape[0],
                             width, combine == "sum", out.data_ptr(), torch.get_num_threads(),
                             *(() if bags is None else bags.arguments()))
    return out


class Bags:
    """``nn.EmbeddingBag`` pooling for the C lookups of ``count`` ids: bag b holds the ids from
    ``starts[b]`` to the next start; optional per-id weights (sum mode); ids equal to
    ``padding_idx`` left out; sum or mean."""

    def __init__(self, count: int, starts: torch.Tensor, weights: torch.Tensor | None, padding_idx: int | None,
                 mode: str) -> None:
        if mode not in ("sum", "mean"):
            raise ValueError(f"the C bags pool by 'sum' or 'mean', not {mode!r}")
        if starts.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(starts.shape)}")
        if starts.numel() and (int(starts[0]) != 0 or bool((starts[1:] < starts[:-1]).any())
                               or int(starts[-1]) > count):
            raise ValueError(f"offsets must be the bags' starting positions: 0 first, never decreasing, at most "
                             f"the number of ids ({count}); got {starts.tolist()[:8]}"
                             f"{' ...' if starts.numel() > 8 else ''}")
        if weights is not None and weights.shape != (count,):
            raise ValueError(f"per_sample_weights must have one weight per id ({count}), got {tuple(weights.shape)}")
        self.count = starts.shape[0]
        # (B + 1) boundaries; the C side checks they start at 0, end at the id count and never decrease.
        self.bounds = torch.cat([starts.to(torch.int64), torch.tensor([count])]).contiguous()
        self.weights = None if weights is None else weights.to(torch.float32).contiguous()
        self.padding_idx = -1 if padding_idx is None else padding_idx
        self.mean = mode == "mean"

    def arguments(self) -> tuple:
        """The trailing arguments of the C lookups' bag mode (the tensors live as long as this object)."""
        return (self.bounds.data_ptr(), self.count, 0 if self.weights is None else self.weights.data_ptr(),
                self.padding_idx, self.mean)


def hashed_lookup(ids: torch.Tensor, num_embeddings: int, hash: HashFunction, table: torch.Tensor,
                  scale: torch.Tensor | None, bias: torch.Tensor | None, bags: Bags | None = None) -> torch.Tensor:
    """scale[i] * table[hash(i)] + bias[i] for ids (N,) int64 (scale and bias optional); with ``bags``,
    the pooled bags (B, d) instead."""
    if table.shape[0] != hash.buckets:
        raise ValueError(f"table has {table.shape[0]} rows, the hash {hash.buckets} buckets")
    for name, value in (("scale", scale), ("bias", bias)):
        if value is not None and value.shape != (num_embeddings,):
            raise ValueError(f"{name} must have shape ({num_embeddings},), got {tuple(value.shape)}")
    out = torch.empty(ids.shape[0] if bags is None else bags.count, table.shape[1])
    _kernels.hashed_lookup(_address(ids, torch.int64), ids.shape[0], num_embeddings, hash.kind == "universal",
                           hash.a, hash.b, PRIME, hash.buckets, _address(table, torch.float32), table.shape[1],
                           0 if scale is None else _address(scale, torch.float32),
                           0 if bias is None else _address(bias, torch.float32), out.data_ptr(),
                           torch.get_num_threads(), *(() if bags is None else bags.arguments()))
    return out


def tt_lookup(ids: torch.Tensor, num_embeddings: int, left: torch.Tensor, right: torch.Tensor,
              transposed: bool = False) -> torch.Tensor:
    """Row i = left[i // R] @ right[i % R], flattened; left (L, d_left, rank), right (R, rank, d_right).

    ``transposed``: the halves are stored as left^T (L, rank, d_left) and right^T (R, d_right, rank).
    """
    if transposed:
        left_rows, rank, d_left = left.shape
        right_rows, d_right, right_rank = right.shape
    else:
        left_rows, d_left, rank = left.shape
        right_rows, right_rank, d_right = right.shape
    if right_rank != rank:
        raise ValueError(f"half tables disagree on the rank: left {tuple(left.shape)}, right {tuple(right.shape)}")
    out = torch.empty(ids.shape[0], d_left * d_right)
    _kernels.tt_lookup(_address(ids, torch.int64), ids.shape[0], num_embeddings, _address(left, torch.float32),
                       left_rows, d_left, _address(right, torch.float32), right_rows, d_right, rank, transposed,
                       out.data_ptr(), torch.get_num_threads())
    return out


FACTOR_ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2}  # the activations the C factors lookup applies


def factors_lookup(ids: torch.Tensor | None, codes: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None,
                   activation: str = "identity") -> torch.Tensor:
    """Rows act(codes[ids]) @ basis + bias (act in FACTOR_ACTIVATIONS); with ``ids`` None, row i uses
    codes[i] (gathered and activated already)."""
    rows, rank = codes.shape
    if basis.shape[0] != rank or (bias is not None and bias.shape != (basis.shape[1],)):
        raise ValueError(f"codes {tuple(codes.shape)}, basis {tuple(basis.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit together")
    if activation not in FACTOR_ACTIVATIONS:
        raise ValueError(f"the C factors lookup applies {', '.join(FACTOR_ACTIVATIONS)}, not {activation!r}")
    count = rows if ids is None else ids.shape[0]
    out = torch.empty(count, basis.shape[1])
    _kernels.factors_lookup(0 if ids is None else _address(ids, torch.int64), count, rows,
                            _address(codes, torch.float32), rank, FACTOR_ACTIVATIONS[activation],
                            _address(basis, torch.float32), basis.shape[1],
                            0 if bias is None else _address(bias, torch.float32), out.data_ptr(),
                            torch.get_num_threads())
    return out


def bag_sum_backward(index: torch.Tensor, grad: torch.Tensor, table_rows: int) -> torch.Tensor:
    """The table gradient (table_rows, d) of rows = sum_m table[index[:, m]]: row index[r, m] gets grad[r]."""
    n, positions = index.shape
    if grad.dim() != 2 or grad.shape[0] != n:
        raise ValueError(f"index has {n} rows, the gradient {grad.shape[0]}")
    out = torch.empty(table_rows, grad.shape[1])
    _kernels.bag_sum_backward(_address(index, torch.int64), n, positions, table_rows,
                              _address(grad, torch.float32), grad.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def dpq_supported(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """True if the C DPQ kernels take these queries (any layout: only device and dtype matter) against
    keys or centroids (D, K, w) here."""
    _, codewords, width = keys.shape
    return (usable(queries, keys) and queries.dtype == keys.dtype == torch.float32
            and codewords <= DPQ_MAX_CODEWORDS and width <= DPQ_MAX_WIDTH and codewords * width <= DPQ_MAX_PAIRS)


def dpq_sx_forward(qt: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, tau: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (N, D) = first argmax_k (keys_k . q - bias_k) per group, and with ``tau`` the
    probabilities softmax((keys . q - bias) / tau) in blocks of 16 rows, (D, ceil(N / 16), K, 16),
    the layout :func:`dpq_sx_backward` reads. qt (D, w, N), keys (D, K, w), bias (D, K)."""
    groups, width, n = qt.shape
    codewords = keys.shape[1]
    if keys.shape != (groups, codewords, width) or bias.shape != (groups, codewords):
        raise ValueError(f"dpq forward shapes disagree: qt {tuple(qt.shape)}, keys {tuple(keys.shape)}, "
                         f"bias {tuple(bias.shape)}")
    codes = torch.empty(groups, n, dtype=torch.int64)
    probs = torch.empty(groups, -(-n // 16), codewords, 16) if tau is not None else None
    _kernels.dpq_sx_forward(_address(qt, torch.float32), groups, width, n, _address(keys, torch.float32),
                            _address(bias, torch.float32), codewords, 0.0 if tau is None else 1.0 / tau,
                            codes.data_ptr(), 0 if probs is None else probs.data_ptr(), torch.get_num_threads())
    return codes.t(), probs


def dpq_sx_backward(qt: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, probs: torch.Tensor, tau: float,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (of qt (D, w, N), keys (D, K, w), bias (D, K)) of the soft rows softmax(scores / tau) @ values,
    given the rows' gradient ``grad`` in qt's layout and :func:`dpq_sx_forward`'s blocked probabilities."""
    groups, width, n = qt.shape
    codewords = keys.shape[1]
    blocked = (groups, -(-n // 16), codewords, 16)
    if keys.shape != (groups, codewords, width) or values.shape != keys.shape or probs.shape != blocked \
            or grad.shape != qt.shape:
        raise ValueError(f"dpq backward shapes disagree: qt {tuple(qt.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, probs {tuple(probs.shape)}, grad {tuple(grad.shape)}")
    grad_qt, grad_keys, grad_bias = torch.empty_like(qt), torch.empty_like(keys), torch.empty(groups, codewords)
    _kernels.dpq_sx_backward(_address(qt, torch.float32), groups, width, n, _address(keys, torch.float32),
                             _address(values, torch.float32), codewords, _address(probs, torch.float32), 1.0 / tau,
                             _address(grad, torch.float32), grad_qt.data_ptr(), grad_keys.data_ptr(),
                             grad_bias.data_ptr(), torch.get_num_threads())
    return grad_qt, grad_keys, grad_bias


def _check_vq(qt: torch.Tensor, centroids: torch.Tensor) -> tuple[int, int, int, int]:
    groups, width, n = qt.shape
    codewords = centroids.shape[1]
    if centroids.shape != (groups, codewords, width):
        raise ValueError(f"dpq-vq shapes disagree: qt {tuple(qt.shape)}, centroids {tuple(centroids.shape)}")
    return groups, width, n, codewords


def dpq_vq_stats(qt: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and centroid (D, K), float64: the sum and the sum of squares over the N rows of the
    scores -||q - c_k||^2. qt (D, w, N), centroids (D, K, w)."""
    groups, width, n, codewords = _check_vq(qt, centroids)
    total = torch.empty(groups, codewords, dtype=torch.float64)
    total_sq = torch.empty(groups, codewords, dtype=torch.float64)
    _kernels.dpq_vq_stats(_address(qt, torch.float32), groups, width, n, _address(centroids, torch.float32),
                          codewords, total.data_ptr(), total_sq.data_ptr(), torch.get_num_threads())
    return total, total_sq


def dpq_vq_codes(qt: torch.Tensor, centroids: torch.Tensor, mean: torch.Tensor | None = None,
                 inv_std: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (N, D): the first k maximizing (-||q - c_k||^2 - mean_k) * inv_std_k per group (the raw
    scores without ``mean`` and ``inv_std``, both (D, K) float32)."""
    groups, width, n, codewords = _check_vq(qt, centroids)
    if (mean is None) != (inv_std is None) or (mean is not None and (mean.shape != (groups, codewords)
                                                                     or inv_std.shape != mean.shape)):
        raise ValueError("dpq-vq: mean and inv_std must both be (D, K) or both be None")
    codes = torch.empty(groups, n, dtype=torch.int64)
    _kernels.dpq_vq_codes(_address(qt, torch.float32), groups, width, n, _address(centroids, torch.float32),
                          codewords, 0 if mean is None else _address(mean, torch.float32),
                          0 if inv_std is None else _address(inv_std, torch.float32), codes.data_ptr(),
                          torch.get_num_threads())
    return codes.t()
