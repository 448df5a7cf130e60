"""embcompress: shrink embedding tables 10x-1000x and keep the models that use them working.

Example:
    >>> import embcompress, torch
    >>> table = embcompress.build("dpq:variant=sx,groups=8,codewords=16", 10_000, 64)
    >>> table(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
    >>> frozen = table.export()          # bit-packed codes + codebooks
    >>> frozen.num_bytes(), round(frozen.compression_ratio())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .base import CompressedEmbedding
from .config import MethodConfig, SpecError, parse_spec, to_spec
from .frozen import FrozenEmbedding
from .io import ArtifactError, load, save
from .registry import build, get_method, list_methods
from .surgery import CompressionReport, compress_, decompress_, load_pretrained, save_pretrained
from .distill import DistillResult, distill

__all__ = [
    "__version__", "CompressedEmbedding", "FrozenEmbedding", "MethodConfig", "SpecError", "ArtifactError",
    "build", "from_pretrained", "list_methods", "get_method", "parse_spec", "to_spec", "aux_loss",
    "save", "load", "compress_", "decompress_", "save_pretrained", "load_pretrained", "CompressionReport",
    "distill", "DistillResult",
]


def from_pretrained(weight: Any, spec: "str | MethodConfig", padding_idx: int | None = None,
                    **fit_options: Any) -> "CompressedEmbedding | FrozenEmbedding":
    """Compress a pretrained (V, d) matrix post hoc with the method the spec names.

    A memory-mapped table (``np.load(path, mmap_mode="r")`` or ``embcompress.data.open_table_mmap``)
    is never read into memory: it is fit on a sample and encoded in chunks (``embcompress.streaming``),
    and the result is the exported frozen module (a trainable one would hold a full-size table).

    Example:
        >>> table = embcompress.from_pretrained(glove, "codes:books=16,codewords=32")
        >>> frozen = embcompress.from_pretrained(np.load("items.npy", mmap_mode="r"), "pq")
    """
    from .data import MappedTable, open_table_mmap

    if isinstance(weight, (MappedTable, np.memmap)):
        from .streaming import compress_mapped

        opened = weight if isinstance(weight, MappedTable) else open_table_mmap(weight)
        stream = {k: fit_options.pop(k) for k in ("sample", "sample_order", "chunk", "seed", "progress")
                  if k in fit_options}
        try:
            return compress_mapped(opened, spec, padding_idx=padding_idx, fit_options=fit_options, **stream).frozen
        finally:
            if opened is not weight:
                opened.close()
    config = parse_spec(spec)
    return get_method(config.method).from_pretrained(weight, config, padding_idx=padding_idx, **fit_options)


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
