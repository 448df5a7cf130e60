"""TorchRec's row-wise quantized table (FBGEMM int8 / int4) as a task-grid baseline.

What a recommendation engineer deploys instead of a compressed table: an fp32 table trained with
every looked-up row rounded by FBGEMM's own row-wise quantization ops (the ones TorchRec's quantized
EmbeddingBagCollection stores its tables with) and a straight-through gradient, as ``scalar`` does
with ours; deployed bytes are FBGEMM's storage (N-bit values plus scale and bias per row, the row
padded to 16 bytes as TorchRec's TBE holds it). Needs TorchRec's fbgemm-gpu-cpu (optional).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: choice label -> bits per value
FBGEMM_BASELINES = {"torchrec-int8": 8, "torchrec-int4": 4}
ROW_ALIGNMENT = 16  # bytes, TorchRec's TBE row alignment


def fbgemm_available() -> bool:
    try:
        import fbgemm_gpu  # noqa: F401, PLC0415  (registers torch.ops.fbgemm)
    except ImportError:
        return False
    return True


def fbgemm_roundtrip(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Rows (N, d) quantized row-wise by FBGEMM and read back, and FBGEMM's bytes per quantized row
    (before TBE's alignment). d is padded with zero columns to whole fp16 words, as FBGEMM requires."""
    import fbgemm_gpu  # noqa: F401, PLC0415

    dim = rows.shape[1]
    per_word = 16 // bits
    padded = F.pad(rows.float().contiguous(), (0, -dim % per_word))
    # The op pair TorchRec's quantize_state_dict packs its int8 / int4 / int2 tables with (fp16 scale, bias).
    packed = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(padded, bits)
    out = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(packed, bits)
    return out[:, :dim], packed.shape[1]


class FbgemmRowwiseTable(nn.Module):
    """An fp32 (V, d) table whose lookups return FBGEMM's row-wise ``bits``-bit rounding of the rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, padding_idx: int | None = None) -> None:
        super().__init__()
        if bits not in FBGEMM_BASELINES.values():
            raise ValueError(f"FBGEMM row-wise bits must be one of {sorted(FBGEMM_BASELINES.values())}, got {bits}")
        if not fbgemm_available():
            raise ImportError("the torchrec-int* baselines need FBGEMM: pip install --no-deps -r requirements/torchrec.txt")
        self.num_embeddings, self.embedding_dim, self.bits, self.padding_idx = num_embeddings, embedding_dim, bits, padding_idx
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))  # nn.Embedding's init
        if padding_idx is not None:
            with torch.no_grad():
                self.weight[padding_idx].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx)
        flat = rows.reshape(-1, self.embedding_dim)
        quantized = fbgemm_roundtrip(flat.detach(), self.bits)[0].reshape(rows.shape)
        return rows + (quantized - rows).detach()  # straight-through estimator

    def num_bytes(self) -> int:
        """Bytes TorchRec's quantized table of this shape stores."""
        row = fbgemm_roundtrip(self.weight[:1].detach(), self.bits)[1]
        return self.num_embeddings * -(-row // ROW_ALIGNMENT) * ROW_ALIGNMENT
