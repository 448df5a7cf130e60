"""Frozen inference modules: what an exported table deploys, and nothing else.

A format holds its payload as persistent buffers; those buffers are exactly the tensors an
artifact stores, so :meth:`FrozenEmbedding.num_bytes` is exact by construction. Format-level
settings (bits, combine rule, hash parameters) travel as JSON :meth:`metadata`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..validation import check_bag, check_ids, check_table_shape, normalize_padding_idx

__all__ = ["FrozenEmbedding", "register_format", "get_format", "FORMATS"]

FORMATS: dict[str, type["FrozenEmbedding"]] = {}


def register_format(cls: type["FrozenEmbedding"]) -> type["FrozenEmbedding"]:
    if cls.format in FORMATS:
        raise ValueError(f"format {cls.format!r} registered twice")
    FORMATS[cls.format] = cls
    return cls


def get_format(name: str) -> type["FrozenEmbedding"]:
    if name not in FORMATS:
        raise ValueError(f"unknown artifact format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


class FrozenEmbedding(nn.Module):
    """Base of the deployed formats: ``nn.Embedding`` call semantics, no trainable state."""

    format: ClassVar[str] = ""
    #: the format's ``_c_lookup`` also pools bags (see :meth:`pooled`)
    c_bags: ClassVar[bool] = False

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        check_table_shape(num_embeddings, embedding_dim)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        #: the resolved spec of the table this module was exported from (set by ``export()``)
        self.spec: str | None = None
        #: the fit settings that table was made with, when known (recorded in artifacts)
        self.fit_settings: dict[str, Any] | None = None

    # -- what each format implements -------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for a 1-D int64 tensor of valid ids, shape (N, embedding_dim)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """JSON-serializable settings needed, with the stored tensors, to rebuild the module."""
        return {}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        """Refuse stored metadata of the wrong JSON type or range (ValueError naming the field).

        Runs before the constructor: a float where an int belongs passes Python's ``==`` but not
        the C kernels, so the two lookup paths would disagree about the file."""
        if metadata:
            raise ValueError(f"format {cls.format!r} stores no metadata, got keys {sorted(metadata)}")

    def check_stored(self) -> None:
        """Cheap checks of stored tensor values that shapes cannot catch (ValueError)."""

    # -- shared behaviour -------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (*) of any integer dtype -> (*, embedding_dim)."""
        check_ids(ids, self.num_embeddings)
        flat = ids.reshape(-1).long()
        out = self.lookup(flat)
        if self.padding_idx is not None:
            out = out.masked_fill((flat == self.padding_idx).unsqueeze(1), 0.0)
        return out.reshape(*ids.shape, self.embedding_dim)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors an artifact stores."""
        return {name: buf for name, buf in self.state_dict().items()}

    def num_bytes(self) -> int:
        """Bytes of the stored tensors: bit-packed codes, codebooks, cores, factors, scalars."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def dense_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * 4

    def compression_ratio(self) -> float:
        """Against the fp32 dense table."""
        return self.dense_bytes() / max(1, self.num_bytes())

    @torch.no_grad()
    def materialize(self, chunk: int = 65536) -> torch.Tensor:
        """The dense (num_embeddings, embedding_dim) table this module decodes to."""
        rows = [self(torch.arange(s, min(s + chunk, self.num_embeddings)))
                for s in range(0, self.num_embeddings, chunk)]
        return torch.cat(rows)

    def bag(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
        mode: str = "mean",
    ) -> torch.Tensor:
        """``nn.EmbeddingBag`` semantics: ids (B, L) or 1-D with offsets -> (B, embedding_dim)."""
        ids, offsets, per_sample_weights = check_bag(ids, offsets, per_sample_weights, mode, self.num_embeddings)
        if mode != "max":
            pooled = self.pooled(ids, offsets, per_sample_weights, mode)
            if pooled is not None:
                return pooled
        rows = self(ids)
        if self.padding_idx is not None:
            keep = ids != self.padding_idx
            ids_for_bag = torch.arange(ids.numel())
            ids_for_bag = ids_for_bag.masked_fill(~keep, ids.numel())  # padding -> a zero row
            rows = torch.cat([rows, rows.new_zeros(1, self.embedding_dim)])
            return F.embedding_bag(ids_for_bag, rows, offsets, mode=mode,
                                   per_sample_weights=per_sample_weights, padding_idx=ids.numel())
        return F.embedding_bag(torch.arange(ids.numel()), rows, offsets, mode=mode,
                               per_sample_weights=per_sample_weights)

    def _c_lookup(self, ids: torch.Tensor, bags: "kernels.Bags | None" = None) -> torch.Tensor | None:
        """The fused C lookup of ids (rows, or with ``bags`` the pooled bags), or None where it cannot run."""
        return None

    def pooled(self, ids: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
               mode: str) -> torch.Tensor | None:
        """Sum or mean bags computed without the (N, d) rows, or None to pool the rows.

        In C for the formats whose ``_c_lookup`` pools (``c_bags``); ``bag`` has checked the ids and mode."""
        if not self.c_bags:
            return None
        return self._c_lookup(ids, kernels.Bags(ids.shape[0], offsets, per_sample_weights, self.padding_idx, mode))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}, "
                f"bytes={self.num_bytes()}, ratio={self.compression_ratio():.1f}x")

    @classmethod
    def from_stored(
        cls,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None,
    ) -> "FrozenEmbedding":
        """Rebuild from an artifact's tensors and metadata: metadata types and ranges first
        (:meth:`check_metadata`), shapes in the constructor, stored values (:meth:`check_stored`) last."""
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a JSON object, got {type(metadata).__name__}")
        cls.check_metadata(metadata)
        clash = set(metadata) & set(tensors)
        if clash:
            raise ValueError(f"names {sorted(clash)} are both metadata and tensors")
        module = cls(num_embeddings, embedding_dim, padding_idx, **metadata, **tensors)
        expected = module.stored_tensors()
        if set(expected) != set(tensors):
            raise ValueError(f"format {cls.format!r} stores {sorted(expected)}, artifact has {sorted(tensors)}")
        module.check_stored()
        return module
