"""Dispatch to the fused C kernels (``embcompress._kernels``), with torch's path as the fallback.

The lookups of the frozen formats (codebook, hashed, tt, factors) and two training hot spots
(DPQ-SX's scores/softmax and the codebook gradient of bag sums) have C versions. The extension is
optional: it is built at install time when a C compiler is present. Callers ask :func:`usable`
first; the torch path runs instead when the extension is missing or turned off
(``EMBCOMPRESS_KERNELS=0`` or :func:`set_enabled`), while a graph is being captured (TorchScript,
``torch.export``, ``torch.compile``, ONNX keep plain torch ops), and for tensors not on the CPU.
Both paths give the same numbers: bit for bit where no sum is reordered, within float rounding
otherwise (tests/test_kernels.py). The wrappers check every shape the C code relies on. Lookups (used by
the deployed formats in ``frozen/``) live in :mod:`.lookup`, training kernels (used by the methods)
in :mod:`.training`; both share the extension and its switch (:mod:`._extension`).
"""

from __future__ import annotations

from . import lookup, training
from ._extension import (DPQ_MAX_CODEWORDS, DPQ_MAX_PAIRS, DPQ_MAX_WIDTH, TT_MAX_ROW, available, enabled, set_enabled,
                         usable)
from .lookup import FACTOR_ACTIVATIONS, Bags, codebook_lookup, factors_lookup, hashed_lookup, tt_lookup
from .training import (bag_sum_backward, dpq_supported, dpq_sx_backward, dpq_sx_forward, dpq_vq_codes,
                       dpq_vq_stats)

__all__ = ["lookup", "training", "available", "enabled", "set_enabled", "usable", "Bags", "codebook_lookup",
           "hashed_lookup", "tt_lookup", "factors_lookup", "FACTOR_ACTIVATIONS", "bag_sum_backward", "dpq_supported",
           "dpq_sx_forward", "dpq_sx_backward", "dpq_vq_stats", "dpq_vq_codes", "TT_MAX_ROW", "DPQ_MAX_CODEWORDS",
           "DPQ_MAX_WIDTH", "DPQ_MAX_PAIRS"]
