"""C kernels of training steps: the codebook gradient of bag sums (codes, dpq's hard rows) and
DPQ's scores, codes, softmax and their backward (SX), nearest-centroid codes and statistics (VQ)."""

from __future__ import annotations

import torch

from ._extension import DPQ_MAX_CODEWORDS, DPQ_MAX_PAIRS, DPQ_MAX_WIDTH, _address, _kernels, usable

__all__ = ["bag_sum_backward", "dpq_supported", "dpq_sx_forward", "dpq_sx_backward", "dpq_vq_stats", "dpq_vq_codes"]


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
    shapes = {None if t is None else tuple(t.shape) for t in (mean, inv_std)}
    if shapes not in ({None}, {(groups, codewords)}):
        raise ValueError("dpq-vq: mean and inv_std must both be (D, K) or both be None")
    codes = torch.empty(groups, n, dtype=torch.int64)
    _kernels.dpq_vq_codes(_address(qt, torch.float32), groups, width, n, _address(centroids, torch.float32),
                          codewords, 0 if mean is None else _address(mean, torch.float32),
                          0 if inv_std is None else _address(inv_std, torch.float32), codes.data_ptr(),
                          torch.get_num_threads())
    return codes.t()
