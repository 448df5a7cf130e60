"""Small task models whose embedding tables are swappable modules.

Each model takes its table(s) as constructor arguments: an ``nn.Embedding`` for the uncompressed
reference or any ``embcompress.CompressedEmbedding`` (same call semantics), so the rest of the
model is identical across methods.

Shapes: B = batch, L = sequence length, d = embedding dim, C = classes, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import PAD

__all__ = ["SentimentCNN", "BagOfEmbeddings", "LSTMLanguageModel", "MatrixFactorization"]


class SentimentCNN(nn.Module):
    """Kim (2014)-style CNN: convolutions of several widths, max over time, linear classifier.

    ids (B, L) -> logits (B, C).
    """

    def __init__(self, table: nn.Module, embedding_dim: int, classes: int = 2, filters: int = 64,
                 widths: tuple[int, ...] = (3, 4, 5), dropout: float = 0.5) -> None:
        super().__init__()
        self.table = table
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, filters, w, padding=w // 2) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(filters * len(widths), classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.table(ids).transpose(1, 2)                                   # (B, d, L)
        mask = (ids == PAD).unsqueeze(1)                                       # (B, 1, L)
        pooled = []
        for conv in self.convs:
            h = F.relu(conv(x))[..., :ids.shape[1]]                            # (B, filters, L)
            pooled.append(h.masked_fill(mask, 0.0).amax(dim=2))                # relu >= 0, so 0 is neutral
        return self.out(self.dropout(torch.cat(pooled, dim=1)))


class BagOfEmbeddings(nn.Module):
    """Mean of the word vectors, then a linear classifier (DPQ's text-classification model).

    ids (B, L) -> logits (B, C).
    """

    def __init__(self, table: nn.Module, embedding_dim: int, classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.table = table
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(embedding_dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != PAD).unsqueeze(2).float()                               # (B, L, 1)
        mean = (self.table(ids) * keep).sum(1) / keep.sum(1).clamp_min(1.0)     # (B, d)
        return self.out(self.dropout(mean))


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM LM; only the input table is compressed, the softmax layer stays dense.

    ids (B, T) -> logits (B, T, V).
    """

    def __init__(self, table: nn.Module, embedding_dim: int, vocab_size: int, hidden: int = 256,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.table = table
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, state = self.lstm(self.dropout(self.table(ids)), state)
        return self.out(self.dropout(h)), state


class MatrixFactorization(nn.Module):
    """Dot-product MF over a user table and an item table (both swappable).

    users (B,), items (B, k) -> scores (B, k); ``all_scores(users)`` -> (B, num_items).
    ``l2`` weighs the L2 penalty on the looked-up vectors that the training loss adds.
    """

    def __init__(self, users: nn.Module, items: nn.Module, num_items: int, l2: float = 0.0) -> None:
        super().__init__()
        self.users = users
        self.items = items
        self.num_items = num_items
        self.l2 = l2

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.users(users).unsqueeze(1) * self.items(items)).sum(-1)

    def all_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.users(users) @ self.items(torch.arange(self.num_items)).T
