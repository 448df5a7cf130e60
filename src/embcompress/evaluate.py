"""What a compressed table kept: reconstruction error, neighbours, and word-level benchmarks.

- ``rel_mse``: mean squared error over the mean squared deviation from the column means
  (0 = perfect, 1 = as good as predicting the column means);
- ``mean_cosine``: mean cosine similarity between original and reconstructed rows;
- ``knn_overlap@10``: mean overlap of the 10 nearest neighbours (cosine) of sampled rows;
- ``ws353`` / ``simlex``: Spearman correlation of cosine similarity with human scores;
- ``analogy``: 3CosAdd accuracy on the Google analogy set over the 30k most frequent rows.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["reconstruction_metrics", "word_metrics", "quality_report", "spearman"]

log = logging.getLogger(__name__)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (no scipy needed)."""

    def ranks(values: Sequence[float]) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(v):  # average the ranks of ties
            tied = v == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


@torch.no_grad()
def reconstruction_metrics(approx: torch.Tensor, reference: torch.Tensor, *, sample: int = 1000,
                           neighbours: int = 10, seed: int = 0) -> dict[str, float]:
    if approx.shape != reference.shape:
        raise ValueError(f"compressed table {tuple(approx.shape)} and reference {tuple(reference.shape)} differ; "
                         "evaluate against the table that was compressed")
    approx, reference = approx.float(), reference.float()
    error = (approx - reference).pow(2).mean()
    spread = (reference - reference.mean(0)).pow(2).mean().clamp_min(1e-12)
    cosine = F.cosine_similarity(approx, reference, dim=1).mean()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(reference.shape[0], generator=generator)[:sample]
    report = {"rel_mse": float(error / spread), "mean_cosine": float(cosine)}
    k = min(neighbours, reference.shape[0] - 1)
    if k > 0 and sample > 0:
        report[f"knn_overlap@{neighbours}"] = _knn_overlap(approx, reference, rows, k)
    return report


def _knn_overlap(approx: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor, k: int) -> float:
    def neighbours_of(table: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(table, dim=1)
        found = []
        for start in range(0, len(rows), 256):
            batch = rows[start:start + 256]
            scores = unit[batch] @ unit.T
            scores[torch.arange(len(batch)), batch] = -2.0  # a row is not its own neighbour
            found.append(scores.topk(k, dim=1).indices)
        return torch.cat(found)

    a, b = neighbours_of(approx), neighbours_of(reference)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().sum(1)
    return float((hits / k).mean())


@torch.no_grad()
def word_metrics(table: torch.Tensor, words: Sequence[str], *, analogy: bool = True,
                 analogy_rows: int = 30000) -> dict[str, float]:
    """WS353, SimLex-999 and analogy accuracy for a table whose rows are named by ``words``."""
    from .data import analogy_questions, word_similarity_sets

    index: dict[str, int] = {}
    for i, word in enumerate(words):
        index.setdefault(word.lower(), i)
    unit = F.normalize(table.float(), dim=1)
    results: dict[str, float] = {}
    for name, pairs in word_similarity_sets().items():
        kept = [(index[a], index[b], s) for a, b, s in pairs if a in index and b in index]
        if len(kept) < 10:
            continue
        left = torch.tensor([a for a, _, _ in kept])
        right = torch.tensor([b for _, b, _ in kept])
        cosines = (unit[left] * unit[right]).sum(1).tolist()
        results[name] = spearman(cosines, [s for _, _, s in kept])
        results[f"{name}_pairs"] = len(kept)
    top = unit[:analogy_rows]
    questions = [q for q in analogy_questions() if all(w in index and index[w] < analogy_rows for w in q)] \
        if analogy else []
    if questions:
        ids = torch.tensor([[index[w] for w in q] for q in questions])
        correct = 0
        for start in range(0, len(ids), 1024):
            batch = ids[start:start + 1024]
            target = top[batch[:, 1]] - top[batch[:, 0]] + top[batch[:, 2]]
            scores = F.normalize(target, dim=1) @ top.T
            scores.scatter_(1, batch[:, :3], -2.0)  # exclude the question words (3CosAdd)
            correct += int((scores.argmax(1) == batch[:, 3]).sum())
        results["analogy"] = correct / len(ids)
        results["analogy_questions"] = len(ids)
    return results


def quality_report(approx: torch.Tensor, reference: torch.Tensor, words: Sequence[str] | None = None,
                   *, sample: int = 1000, analogy: bool = True) -> dict[str, float]:
    """Reconstruction metrics (neighbours on ``sample`` rows, 0 skips), plus word metrics when rows are named."""
    report = reconstruction_metrics(approx, reference, sample=sample)
    if words is not None:
        try:
            report.update(word_metrics(approx, words, analogy=analogy))
        except FileNotFoundError as exc:  # the word-similarity data package is optional
            log.warning("skipping word similarity: %s", exc)
    return report
