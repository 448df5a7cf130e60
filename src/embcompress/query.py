"""The (V, d) query table that DPQ and compositional codes learn their codes from (training only).

It lives in an ``nn.Embedding`` submodule because DDP all-reduces sparse gradients only for the
weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules built with ``sparse=True``; a bare
Parameter with a sparse gradient fails under DDP ("Cannot access storage of SparseTensorImpl").
In state dicts and artifacts it keeps its plain name, ``query``, as before it became a submodule.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QueryTableMixin"]

STATE_KEY = "query"
MODULE_KEY = "query_table.weight"


class QueryTableMixin:
    """Adds ``self.query`` (the table's weight, (V, d)) backed by ``self.query_table``."""

    @property
    def query(self) -> torch.Tensor:
        # An AttributeError here (no table: codes in the fixed state) reads as "no query", as hasattr expects.
        return self.query_table.weight

    def _query_rows(self, ids: torch.Tensor, sparse: bool) -> torch.Tensor:
        """Query rows (N, d) of ``ids`` (N,). The one place the methods read Q per id, so an engine
        that holds Q itself (TorchRec, ``embcompress.integrations.torchrec``) can supply the rows."""
        return F.embedding(ids, self.query, sparse=sparse)

    def _add_query_table(self, num_embeddings: int, embedding_dim: int, sparse: bool) -> None:
        # N(0, 1) like nn.Embedding, drawn exactly as torch.randn(V, d) would be.
        self.query_table = nn.Embedding(num_embeddings, embedding_dim, sparse=sparse)
        if not getattr(self, "_query_hooks", False):
            module = cast(nn.Module, self)  # the mixin sits on an nn.Module subclass
            module.register_state_dict_post_hook(_save_as_query)
            module.register_load_state_dict_pre_hook(_load_from_query)
            self._query_hooks = True


def _save_as_query(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if prefix + MODULE_KEY in state_dict:
        state_dict[prefix + STATE_KEY] = state_dict.pop(prefix + MODULE_KEY)


def _load_from_query(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix + STATE_KEY in state_dict:
        state_dict[prefix + MODULE_KEY] = state_dict.pop(prefix + STATE_KEY)
