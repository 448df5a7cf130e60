"""embcompress: shrink embedding tables 10x-1000x and keep the models that use them working.

Example:
    >>> import embcompress, torch
    >>> table = embcompress.build("dpq:variant=sx,groups=8,codewords=16", 10_000, 64)
    >>> table(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
    >>> frozen = table.export()          # bit-packed codes + codebooks
    >>> frozen.num_bytes(), round(frozen.compression_ratio())
    (44096, 58)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from . import budget
from ._version import __version__
from .base import CompressedEmbedding
from .budget import config_for_budget
from .config import Config, FitConfig, FitLike, MethodConfig, SpecError, parse_spec, to_spec
from .distill import DistillConfig, DistillResult, distill
from .frozen import FrozenEmbedding
from .io import ArtifactError, load, save
from .registry import build, get_method, list_methods
from .surgery import CompressionReport, compress_, decompress_, load_pretrained, save_pretrained

__all__ = [
    "__version__", "CompressedEmbedding", "FrozenEmbedding", "Config", "MethodConfig", "FitConfig",
    "SpecError", "ArtifactError", "build", "from_pretrained", "list_methods", "get_method", "parse_spec", "to_spec",
    "aux_loss", "config_for_budget", "save", "load", "compress_", "decompress_", "save_pretrained",
    "load_pretrained", "CompressionReport", "distill", "DistillConfig", "DistillResult", "budget",
]


def from_pretrained(weight: Any, spec: "str | MethodConfig", padding_idx: int | None = None,
                    fit: FitLike = None, *, progress: bool | None = None, row_weights: torch.Tensor | None = None,
                    **fit_options: Any) -> "CompressedEmbedding | FrozenEmbedding":
    """Compress a pretrained (V, d) matrix post hoc with the method the spec names.

    ``fit`` sets how the method fits (its ``Fit`` config, a ``"key=value,..."`` string or a dict);
    keyword ``fit_options`` are the same settings as keywords. Misspelt names are errors.
    ``row_weights`` (V,) weighs each row's error (e.g. token counts) in the fits that take it
    (codes, dpq, lowrank, pq).

    A memory-mapped table (``np.load(path, mmap_mode="r")`` or ``embcompress.data.open_table_mmap``)
    is never read into memory: it is fit on a sample and encoded in chunks (``embcompress.streaming``),
    and the result is the exported frozen module (a trainable one would hold a full-size table).

    Example:
        >>> import embcompress, torch
        >>> table = embcompress.from_pretrained(torch.randn(300, 16), "pq:groups=4,codewords=8", fit="iters=30")
        >>> table.fit_settings["iters"]
        30
    """
    from .data import MappedTable, open_table_mmap

    if isinstance(weight, (MappedTable, np.memmap)):
        from .streaming import compress_mapped

        if row_weights is not None:
            raise ValueError("row_weights apply to a table in memory, not a memory-mapped one; load it with "
                             "torch.from_numpy(np.load(path)) to weigh its rows")

        stream = {k: fit_options.pop(k) for k in ("sample", "sample_order", "chunk") if k in fit_options}
        settings = get_method(parse_spec(spec).method).Fit.parse(fit, **fit_options)
        opened = weight if isinstance(weight, MappedTable) else open_table_mmap(weight)
        try:
            frozen = compress_mapped(opened, spec, padding_idx=padding_idx, fit_options=settings, progress=progress,
                                     **stream).frozen
            assert frozen is not None  # no output file: the frozen module is returned
            return frozen
        finally:
            if opened is not weight:
                opened.close()
    config = parse_spec(spec)
    return get_method(config.method).from_pretrained(weight, config, padding_idx, fit, progress=progress,
                                                     row_weights=row_weights, **fit_options)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of every compressed table in ``model`` (0 if none).

    Add it to the task loss: ``loss = task_loss + embcompress.aux_loss(model)``.
    """
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, CompressedEmbedding):
            term = module.aux_loss()
            if term is not None:
                total = total + term
    return total
