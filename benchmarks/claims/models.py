"""Models of the claims benchmark; each takes its embedding table as a constructor argument, so the
rest of the model is the same for the dense reference and every compressed table.

Shapes: B = batch, L = sequence length, W = history window, d = embedding dim, V = vocabulary / items.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from benchmarks.tasks.datasets import PAD

__all__ = ["LSTMClassifier", "MeanPoolMLP", "WordLM", "NextItemModel", "HashWithBias", "Popularity", "all_rows"]


def all_rows(table: nn.Module, num_rows: int) -> torch.Tensor:
    """Every row of a table as the current mode decodes it (V, d); differentiable."""
    if isinstance(table, nn.Embedding):
        return table.weight
    return table(torch.arange(num_rows))


class LSTMClassifier(nn.Module):
    """(Bi)LSTM over the words, the last layer's final state(s), a linear classifier.

    ids (B, L) -> logits (B, C). Padding (id 0) is skipped with packed sequences.
    """

    def __init__(self, table: nn.Module, dim: int, hidden: int, classes: int, layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.table = table
        self.bidirectional = bidirectional
        self.lstm = nn.LSTM(dim, hidden, layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != PAD).sum(1).clamp_min(1)
        x = self.dropout(self.table(ids))                                           # (B, L, d)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)                                               # (layers * dirs, B, H)
        features = torch.cat([h[-2], h[-1]], 1) if self.bidirectional else h[-1]
        return self.out(self.dropout(features))


class MeanPoolMLP(nn.Module):
    """DPQ's text classifier: mean of the word vectors, one hidden ReLU layer, linear output.

    ids (B, L) -> logits (B, C).
    """

    def __init__(self, table: nn.Module, dim: int, hidden: int, classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.table = table
        self.hidden = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != PAD).unsqueeze(2).float()                                    # (B, L, 1)
        mean = (self.table(ids) * keep).sum(1) / keep.sum(1).clamp_min(1.0)          # (B, d)
        return self.out(self.dropout(F.relu(self.hidden(self.dropout(mean)))))


class WordLM(nn.Module):
    """Word-level LSTM LM; ``tied`` uses the (possibly compressed) input table as the softmax weights.

    ids (B, T) -> logits (B, T, V), state.
    """

    def __init__(self, table: nn.Module, dim: int, vocab: int, hidden: int, layers: int = 1,
                 dropout: float = 0.3, tied: bool = False) -> None:
        super().__init__()
        if tied and hidden != dim:
            raise ValueError(f"a tied LM needs hidden == dim, got hidden={hidden}, dim={dim}")
        self.table, self.vocab, self.tied = table, vocab, tied
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(dim, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(hidden, vocab)
        if tied:
            del self.out.weight  # the softmax weights are the table's rows

    def forward(self, ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, state = self.lstm(self.dropout(self.table(ids)), state)
        h = self.dropout(h)
        if self.tied:
            return h @ all_rows(self.table, self.vocab).T + self.out.bias, state
        return self.out(h), state


class NextItemModel(nn.Module):
    """Next-item prediction: mean of the last W items' input vectors (the compressed table), a
    tanh layer, then a DENSE output item table (scores for every item).

    history (B, W) with padding id ``num_items`` -> scores (B, num_items).
    """

    def __init__(self, table: nn.Module, dim: int, num_items: int) -> None:
        super().__init__()
        self.table, self.pad = table, num_items
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, num_items)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        keep = (history != self.pad).unsqueeze(2).float()
        mean = (self.table(history) * keep).sum(1) / keep.sum(1).clamp_min(1.0)     # (B, d)
        return self.out(torch.tanh(self.mix(mean)))


class HashWithBias(nn.Module):
    """The hashing trick plus a per-ID scalar added to every entry (the MEmCom paper's baseline)."""

    def __init__(self, hashed: nn.Module, num_embeddings: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.hashed = hashed
        self.bias = nn.Embedding(num_embeddings, 1, padding_idx=padding_idx)
        nn.init.zeros_(self.bias.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hashed(ids) + self.bias(ids)

    def num_bytes(self) -> int:
        return int(self.hashed.export().num_bytes()) + 4 * self.bias.weight.numel()


class Popularity(nn.Module):
    """Scores every item by its training count (no parameters; the non-personalized floor)."""

    def __init__(self, counts: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts.float())

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(history.shape[0], -1)
