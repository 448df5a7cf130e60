"""Compressed tables as TorchRec modules, trained sharded with TorchRec's own machinery.

Optional extra: ``pip install --no-deps -r requirements/torchrec.txt`` (torchrec 1.8.0 with the CPU
fbgemm); imported lazily, the core never imports this package.

Example:
    >>> from torchrec import EmbeddingBagConfig
    >>> from embcompress.integrations.torchrec import CompressedEmbeddingBagCollection
    >>> tables = [EmbeddingBagConfig(name="user", embedding_dim=64, num_embeddings=10_000_000,
    ...                              feature_names=["user_id"])]
    >>> ebc = CompressedEmbeddingBagCollection(tables, {"user": "dpq:groups=16,codewords=16"})
    >>> pooled = ebc(kjt)                     # KeyedTensor, like EmbeddingBagCollection
"""

from __future__ import annotations

INSTALL_TORCHREC = "pip install --no-deps -r requirements/torchrec.txt  (torchrec 1.8.0 + fbgemm-gpu-cpu 1.8.0)"

try:
    import torchrec as _torchrec  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"embcompress.integrations.torchrec needs TorchRec: {INSTALL_TORCHREC}") from exc

from .collection import CompressedEmbeddingBagCollection, CompressedEmbeddingCollection  # noqa: E402
from .sharding import check_same_on_all_ranks, compressed_tables, sharding_constraints, sharding_plan  # noqa: E402

__all__ = ["CompressedEmbeddingBagCollection", "CompressedEmbeddingCollection", "sharding_constraints",
           "sharding_plan", "check_same_on_all_ranks", "compressed_tables", "INSTALL_TORCHREC"]
