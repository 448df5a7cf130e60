"""The four benchmark tasks, their sizes, and one training "cell" (task x table choice x seed).

A cell builds every embedding table of the task's model from a :class:`Choice` (the dense
reference, a spec string, or a method at a target compression ratio resolved by
``embcompress.budget.config_for_budget``), trains the model from scratch (the sentiment table
starts from GloVe, via ``from_pretrained`` for compressed methods), keeps the epoch with the best
validation score, and reports test metrics with the exact exported bytes of each table.

The ``two-stage`` procedure (the distilled method's full recipe, task 5) trains the dense model,
fits the compressed table to the trained table (stage 1), then fine-tunes the whole model with
knowledge distillation from the dense one (stage 2).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import embcompress
from embcompress.budget import config_for_budget
from embcompress.config import SpecError, parse_spec
from embcompress.progress import progress_bar

from . import datasets as D
from .fbgemm_table import FBGEMM_BASELINES, FbgemmRowwiseTable, fbgemm_available
from .models import BagOfEmbeddings, LSTMLanguageModel, MatrixFactorization, SentimentCNN

__all__ = ["Choice", "Cell", "SIZES", "TASKS", "TableShape", "make_table", "run_cell", "prepared", "ranking_metrics",
           "unreachable_reason", "cell_record"]

log = logging.getLogger(__name__)

# Hyperparameters per size. "quick" is a smoke run for CI (minutes); "standard" is the real one.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "sentiment": dict(limit=2000, max_len=32, epochs=2, batch=64, lr=2e-3, filters=32),
        "topic": dict(limit=500, max_len=128, min_count=2, dim=32, epochs=3, batch=32, lr=1e-2),
        "lm": dict(vocab=2000, tokens=(40_000, 8_000, 8_000), dim=32, hidden=64, bptt=32, batch=32,
                   epochs=1, lr=3e-3),
        "rec": dict(dim=16, epochs=3, batch=2048, lr=5e-2, l2=0.003),
        "distill": dict(epochs=1, temperature=2.0, alpha=0.5),
        # Post hoc fits (from_pretrained / stage 1) shortened: a smoke run. Base specs fix fields
        # config_for_budget must keep.
        "fit": {"dpq": dict(steps=30, iters=5), "tt": dict(steps=30), "distilled": dict(steps=50),
                "codes": dict(steps=0, rounds=0, beam=1, sample=4096, polish=0, search=1)},
        "base_specs": {"pq": "pq:iters=5"},
    },
    "standard": {
        # Sized to about 50 min on 2 idle cores for the whole grid (measured: 5,896 CPU seconds over
        # 519 cells; run.py logs the estimate from cell_seconds below). Cuts from the first sizing
        # (estimated there at ~149 min): topic documents truncated at 128 tokens instead of 256 (dense
        # test accuracy 94.2% vs 96.9% on seed 0, every cell ~1.7x cheaper), LM vocabulary 5,000
        # instead of 10,000 (the softmax is most of an LM cell: 10.7 s instead of 25 s at 2 epochs),
        # and `codes` trained from scratch not run at 4x (run.py PLANS; scalar int8 covers 4x). The LM
        # trains 4 epochs: at 2 its dense validation perplexity was still falling fast (268 -> 237 from
        # epoch 2 to 4, seed 0) and every compressed table looked worse than it is (DPQ at 16.8x:
        # +3.6% perplexity at 2 epochs, +0.7% at 4, 3 seeds).
        "sentiment": dict(limit=None, max_len=40, epochs=4, batch=64, lr=2e-3, filters=64),
        "topic": dict(limit=None, max_len=128, min_count=2, dim=64, epochs=6, batch=32, lr=1e-2),
        "lm": dict(vocab=5_000, tokens=(100_000, 15_000, 15_000), dim=64, hidden=64, bptt=24, batch=32,
                   epochs=4, lr=1e-2),
        # Tuned on the validation split (dense model, seed 0; dim 16-64, lr 0.01-0.1, batch 512-2048,
        # L2 0-0.3 on the looked-up vectors, decoupled weight decay 0-1): every setting peaks at
        # val nDCG@10 0.044-0.055, L2 0.003 highest at dim 64; the same settings train every table.
        "rec": dict(dim=64, epochs=30, batch=2048, lr=5e-2, l2=0.003),
        "distill": dict(epochs=1, temperature=2.0, alpha=0.5),
        # Post hoc fits (sentiment's GloVe start, stage 1 of two-stage) at about a tenth of the
        # library defaults' cost. codes: no Gumbel autoencoder, greedy encoding, no polish.
        "fit": {"dpq": dict(steps=100, iters=10), "codes": dict(steps=0, rounds=1, beam=1, polish=0, search=1),
                "tt": dict(steps=100), "distilled": dict(steps=200)},
        "base_specs": {"pq": "pq:iters=10"},
        # CPU seconds of one cell per task and kind at these sizes (torch threads 1, seed 0, measured
        # 2026-11-30 after the codes budget rule moved to K >= 8); run.py's time estimate. Measured:
        # sentiment full 9.5, codes@10x 19.1 (12 s of it the post hoc fit), codes@30x 11.9, dpq@30x
        # 14.6, tt@100x 9.4, hash@10x 8.4; topic full 2.8, dpq@10x 14.8, codes@30x 11.2, hash@10x 1.5,
        # tt@30x 2.4 (codes@10x 87 s at 256 tokens, ~50 s at 128); LM (4 epochs, means over the
        # standard run's cells) full / scalar 19.7, dpq 21.1, codes 21.5, others 18.4, two-stage 11.2
        # (stage 2 is one epoch); rec full 5.0, memcom@16x 5.7,
        # hash@16x 4.4, codes@10x 85 (a Gumbel softmax over every looked-up row, 1,440 steps).
        # codes cost grows with books, so its entry is the mean over the ratios run (10x-300x).
        "cell_seconds": {
            "sentiment": {"full": 9.5, "compressed": 11.0, "codes": 14.0, "dpq": 14.6, "two-stage": 12.0},
            "topic": {"full": 2.8, "compressed": 3.0, "codes": 20.0, "dpq": 14.8},
            "lm": {"full": 19.7, "compressed": 18.4, "codes": 21.5, "dpq": 21.1, "two-stage": 11.2},
            "rec": {"full": 5.0, "compressed": 5.5, "codes": 35.0},
        },
    },
}


@dataclass(frozen=True)
class Choice:
    """How to build every table of a cell: ``full``, a ``spec`` string, or ``method`` at ``ratio``."""

    label: str
    method: str
    spec: str | None = None
    ratio: float | None = None

    @classmethod
    def full(cls) -> "Choice":
        return cls("full", "full")

    @classmethod
    def from_spec(cls, spec: str) -> "Choice":
        return cls(spec, parse_spec(spec).method, spec=spec)

    @classmethod
    def at_ratio(cls, method: str, ratio: float) -> "Choice":
        return cls(f"{method}@{ratio:g}x", method, ratio=ratio)


@dataclass(frozen=True)
class Cell:
    task: str
    choice: Choice
    seed: int
    size: str = "standard"
    procedure: str = "scratch"  # or "two-stage" (stage-1 fit to the trained dense table + distillation)
    split_seed: int = 0

    def key(self) -> str:
        return f"{self.task}|{self.procedure}|{self.choice.label}|{self.seed}"


@dataclass
class TableShape:
    name: str
    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None
    pretrained: torch.Tensor | None = field(default=None, repr=False)


# --- tables ------------------------------------------------------------------------------------

def make_table(choice: Choice, shape: TableShape, fit_options: dict[str, dict[str, Any]] | None = None,
               base_specs: dict[str, str] | None = None) -> tuple[nn.Module, str]:
    """The table a choice asks for and its resolved spec ("full" for the dense reference).

    ``fit_options[method]`` goes to ``from_pretrained``; ``base_specs[method]`` holds fields the
    budget search keeps. Raises SpecError when the method cannot reach the ratio on this shape.
    """
    if choice.method in FBGEMM_BASELINES:
        bits = FBGEMM_BASELINES[choice.method]
        return FbgemmRowwiseTable(shape.num_embeddings, shape.embedding_dim, bits, shape.padding_idx), choice.method
    if choice.method == "full":
        table = nn.Embedding(shape.num_embeddings, shape.embedding_dim, padding_idx=shape.padding_idx)
        if shape.pretrained is not None:
            with torch.no_grad():
                table.weight.copy_(shape.pretrained)
        return table, "full"
    if choice.spec is not None:
        config = parse_spec(choice.spec)
    else:
        base = (base_specs or {}).get(choice.method, choice.method)
        config = _budget_config(base, shape.num_embeddings, shape.embedding_dim, choice.ratio)
    if shape.pretrained is not None:
        options = (fit_options or {}).get(config.method, {})
        table = embcompress.from_pretrained(shape.pretrained, config, padding_idx=shape.padding_idx, **options)
    else:
        table = embcompress.build(config, shape.num_embeddings, shape.embedding_dim, padding_idx=shape.padding_idx)
    return table, config.to_spec()


#: Budget answers already known, (base spec, rows, dim, ratio) -> resolved spec: run.py's main
#: process settles every cell's budget up front and hands the answers to its workers, which would
#: otherwise repeat the search (the codes search scans ~3,000 candidates, ~1 s of CPU per table shape).
RESOLVED: dict[tuple[str, int, int, float], str] = {}


@functools.lru_cache(maxsize=None)
def _budget_config(base: str, num_embeddings: int, embedding_dim: int, ratio: float) -> Any:
    # Cached: some methods scan thousands of candidates, and every seed asks the same question.
    key = (base, num_embeddings, embedding_dim, ratio)
    if key in RESOLVED:
        return parse_spec(RESOLVED[key])
    config = config_for_budget(base, num_embeddings, embedding_dim, ratio=ratio)
    RESOLVED[key] = config.to_spec()
    return config


def unreachable_reason(cell: Cell) -> str | None:
    """Why a method-at-ratio cell cannot run (the budget search finds no config), else None.

    Cheap next to training (the answer is cached per process), so a run can settle these cells
    up front and count only the cells that will train in its time estimate.
    """
    if cell.choice.ratio is None or cell.choice.method not in embcompress.list_methods():
        return None
    size = SIZES[cell.size]
    base = size["base_specs"].get(cell.choice.method, cell.choice.method)
    data = prepared(cell.task, cell.size, cell.split_seed)
    for shape in TASKS[cell.task].table_shapes(data, size[cell.task]):
        try:
            _budget_config(base, shape.num_embeddings, shape.embedding_dim, cell.choice.ratio)
        except SpecError as exc:
            return str(exc)
    return None


def table_bytes(table: nn.Module) -> int:
    """Exact deployed bytes: the exported artifact's tensors, or fp32 for a dense table."""
    if isinstance(table, nn.Embedding):
        return table.weight.numel() * 4
    if isinstance(table, FbgemmRowwiseTable):
        return table.num_bytes()
    return int(table.export().num_bytes())


# --- tasks -------------------------------------------------------------------------------------

class Task:
    """One benchmark task: data, tables, model, batches, loss and evaluation."""

    name: str = ""
    metric: str = ""                 # the primary test metric
    higher_is_better: bool = True
    table_attrs: dict[str, str] = {"words": "table"}  # table name -> the model attribute holding it

    def prepare(self, size: dict[str, Any], split_seed: int) -> Any:
        raise NotImplementedError

    def table_shapes(self, data: Any, size: dict[str, Any]) -> list[TableShape]:
        raise NotImplementedError

    def model(self, data: Any, tables: dict[str, nn.Module], size: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def batches(self, data: Any, size: dict[str, Any], generator: torch.Generator) -> Iterator[Any]:
        raise NotImplementedError

    def logits_and_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits for distillation, task loss)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, split: str, size: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def labelled(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """A training batch as (inputs, labels), the form ``embcompress.distill`` takes."""
        return batch

    @staticmethod
    def distill_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
        return model(inputs)


class _TextClassification(Task):
    metric = "accuracy"

    def batches(self, data: D.TextSplits, size, generator):
        ids, labels = data.train
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), size["batch"]):
            idx = order[start:start + size["batch"]]
            yield ids[idx], labels[idx]

    def logits_and_loss(self, model, batch):
        ids, labels = batch
        logits = model(ids)
        return logits, F.cross_entropy(logits, labels)

    @torch.no_grad()
    def evaluate(self, model, data, split, size):
        ids, labels = getattr(data, split)
        preds = torch.cat([model(ids[s:s + 512]).argmax(1) for s in range(0, len(labels), 512)])
        return {"accuracy": float((preds == labels).float().mean())}


class Sentiment(_TextClassification):
    """Rotten Tomatoes fresh / rotten with a GloVe-initialized table and a small CNN."""

    name = "sentiment"

    def prepare(self, size, split_seed):
        data = D.rotten_tomatoes(split_seed, max_len=size["max_len"], limit=size["limit"])
        weight, coverage = D.glove_init(data.vocab, seed=split_seed)
        return {"splits": data, "glove": weight, "coverage": coverage}

    def table_shapes(self, data, size):
        weight = data["glove"]
        return [TableShape("words", weight.shape[0], weight.shape[1], D.PAD, weight)]

    def model(self, data, tables, size):
        return SentimentCNN(tables["words"], data["glove"].shape[1], 2, filters=size["filters"])

    def batches(self, data, size, generator):
        return super().batches(data["splits"], size, generator)

    def evaluate(self, model, data, split, size):
        return super().evaluate(model, data["splits"], split, size)


class Topic(_TextClassification):
    """BBC News topics (5 classes) with a bag-of-embeddings model trained from scratch."""

    name = "topic"

    def prepare(self, size, split_seed):
        return D.bbc_news(split_seed, max_len=size["max_len"], min_count=size["min_count"], limit=size["limit"])

    def table_shapes(self, data, size):
        return [TableShape("words", len(data.vocab), size["dim"], D.PAD)]

    def model(self, data, tables, size):
        return BagOfEmbeddings(tables["words"], size["dim"], len(data.classes))


class LanguageModel(Task):
    """Word-level LSTM LM on BBC News + Lee + Wikipedia, split by document; perplexity."""

    name = "lm"
    metric = "perplexity"
    higher_is_better = False

    def prepare(self, size, split_seed):
        return D.lm_corpus(split_seed, vocab_size=size["vocab"], max_tokens=size["tokens"])

    def table_shapes(self, data, size):
        return [TableShape("words", len(data.vocab), size["dim"])]

    def model(self, data, tables, size):
        return LSTMLanguageModel(tables["words"], size["dim"], len(data.vocab), hidden=size["hidden"])

    def batches(self, data: D.LMSplits, size, generator):
        # Random windows of bptt+1 tokens, one pass's worth per epoch (no state carried across).
        span = size["bptt"] + 1
        steps = max(1, len(data.train) // (size["batch"] * size["bptt"]))
        for _ in range(steps):
            starts = torch.randint(0, len(data.train) - span, (size["batch"],), generator=generator)
            yield data.train[starts.unsqueeze(1) + torch.arange(span)]

    def labelled(self, batch):
        return batch[:, :-1], batch[:, 1:]

    @staticmethod
    def distill_logits(model, inputs):
        return model(inputs)[0]

    def logits_and_loss(self, model, batch):
        logits, _ = model(batch[:, :-1])
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, data, split, size):
        stream = getattr(data, split)
        rows = 16
        width = (len(stream) - 1) // rows
        inputs = stream[:rows * width].view(rows, width)
        targets = stream[1:rows * width + 1].view(rows, width)
        state, total, count = None, 0.0, 0
        for s in range(0, width, size["bptt"]):
            logits, state = model(inputs[:, s:s + size["bptt"]], state)
            target = targets[:, s:s + size["bptt"]]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            count += target.numel()
        return {"perplexity": math.exp(total / count)}


class Recommendation(Task):
    """MovieLens-100K, dot-product MF with BPR, leave-last-out; nDCG@10 and HR@10 over all items."""

    name = "rec"
    metric = "ndcg@10"
    table_attrs = {"users": "users", "items": "items"}

    def prepare(self, size, split_seed):
        return D.movielens_100k()

    def table_shapes(self, data: D.Interactions, size):
        return [TableShape("users", data.num_users, size["dim"]), TableShape("items", data.num_items, size["dim"])]

    def model(self, data, tables, size):
        return MatrixFactorization(tables["users"], tables["items"], data.num_items, l2=size.get("l2", 0.0))

    def batches(self, data: D.Interactions, size, generator):
        order = torch.randperm(len(data.train), generator=generator)
        for start in range(0, len(order), size["batch"]):
            pairs = data.train[order[start:start + size["batch"]]]
            negatives = torch.randint(0, data.num_items, (len(pairs),), generator=generator)
            yield pairs[:, 0], torch.stack([pairs[:, 1], negatives], dim=1)

    def logits_and_loss(self, model, batch):
        users, items = batch
        # Scores scaled by 1/d: tables start at unit entry variance (nn.Embedding init) for every
        # method, and a small initial score spread is what MF needs to learn popularity first.
        dim = model.users.embedding_dim
        u, v = model.users(users), model.items(items)                   # (B, d), (B, 2, d)
        scores = (u.unsqueeze(1) * v).sum(-1) / dim
        loss = -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()         # BPR
        l2 = model.l2
        if l2:  # BPR's L2 prior on the looked-up vectors (Rendle et al. 2009), the same for every table
            loss = loss + l2 * (u.pow(2).sum(-1) + v.pow(2).sum((-1, -2))).mean() / dim
        return scores, loss

    @torch.no_grad()
    def evaluate(self, model, data: D.Interactions, split, size):
        targets = getattr(data, split)
        users = torch.arange(data.num_users)
        scores = model.all_scores(users)
        for user in range(data.num_users):  # rank over all items the user has not interacted with
            scores[user, data.seen[user]] = -math.inf
            if split == "test":
                scores[user, data.val[user]] = -math.inf
        return ranking_metrics(scores, targets, k=10)


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> dict[str, float]:
    """nDCG@k and HR@k of one held-out item per row of ``scores`` (B, items), ties broken at random.

    The metrics are their exact expectation over a uniformly random order among the items that tie
    with the target: a table whose rows collide (hashing, codes) scores many items identically, and
    counting only strictly higher scores would rank the target first among all its ties.
    """
    target = scores.gather(1, targets.unsqueeze(1))                              # (B, 1)
    above = (scores > target).sum(1)                                             # (B,)
    ties = (scores == target).sum(1) - 1                                         # others tied with it
    positions = above.unsqueeze(1) + torch.arange(k)                             # (B, k) 0-based ranks
    possible = positions <= (above + ties).unsqueeze(1)                          # rank reachable by tie order
    weight = possible.float() / (ties + 1).unsqueeze(1).float()                  # P(target lands there)
    gain = 1.0 / torch.log2(positions.float() + 2.0)
    in_top = positions < k
    return {f"ndcg@{k}": float((weight * gain * in_top).sum(1).mean()),
            f"hr@{k}": float((weight * in_top).sum(1).mean())}


TASKS: dict[str, Task] = {t.name: t for t in (Sentiment(), Topic(), LanguageModel(), Recommendation())}

_PREPARED: dict[tuple[str, str, int], Any] = {}


def prepared(task: str, size: str, split_seed: int = 0) -> Any:
    """Task data for a size, cached per process (every cell of a run shares one split)."""
    key = (task, size, split_seed)
    if key not in _PREPARED:
        _PREPARED[key] = TASKS[task].prepare(SIZES[size][task], split_seed)
    return _PREPARED[key]


# --- training ----------------------------------------------------------------------------------

def _better(task: Task, a: float, b: float | None) -> bool:
    return b is None or (a > b if task.higher_is_better else a < b)


def train(task: Task, model: nn.Module, data: Any, size: dict[str, Any], seed: int, epochs: int,
          lr: float) -> dict[str, Any]:
    """Adam for ``epochs``; restores the best-validation epoch. Returns val history and best epoch.

    The tables' auxiliary losses (``embcompress.aux_loss``) are added to the task loss.
    """
    generator = torch.Generator().manual_seed(seed)
    # Decoupled weight decay (0 = plain Adam) shrinks every parameter, so rows a batch never
    # touches (rare IDs) decay towards 0 instead of keeping their random start.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=size.get("weight_decay", 0.0))
    best, best_state, best_epoch, history = None, None, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in progress_bar(task.batches(data, size, generator), desc=f"{task.name} epoch {epoch}"):
            loss = task.logits_and_loss(model, batch)[1] + embcompress.aux_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        model.eval()
        score = task.evaluate(model, data, "val", size)[task.metric]
        history.append(score)
        if _better(task, score, best):
            best, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"val_history": history, "best_epoch": best_epoch, "val": best}


def stage2_distill(task: Task, student: nn.Module, teacher: nn.Module, data: Any, size: dict[str, Any],
                   seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 of the distilled method: ``embcompress.distill`` fine-tunes the whole student with
    T^2-scaled logit distillation from the dense teacher mixed with the task loss
    (``alpha * KD + (1 - alpha) * CE``), for ``settings["epochs"]`` passes over the training set.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = [task.labelled(batch) for _ in range(settings["epochs"])
               for batch in task.batches(data, size, generator)]
    outcome = embcompress.distill(student, teacher.eval(), batches, temperature=settings["temperature"],
                                  alpha=settings["alpha"], forward_fn=task.distill_logits, epochs=1,
                                  lr=size["lr"], train="all", seed=seed, progress=False)
    student.eval()
    val = task.evaluate(student, data, "val", size)[task.metric]
    return {"val_history": [val], "best_epoch": settings["epochs"], "val": val,
            "distill_loss": [outcome.first_loss, outcome.final_loss]}


# --- one cell ----------------------------------------------------------------------------------

def _teacher_path(cell: Cell, cache_dir: Path | None) -> Path | None:
    return cache_dir / f"teacher-{cell.task}-{cell.size}-seed{cell.seed}.safetensors" if cache_dir else None


def _save_teacher(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def _teacher(cell: Cell, data: Any, cache_dir: Path | None) -> nn.Module:
    """The trained dense model for the cell's task and seed: the dense reference cell's model when
    it was cached (safetensors), else trained here the same way."""
    from safetensors.torch import load_file

    task, size = TASKS[cell.task], SIZES[cell.size][cell.task]
    torch.manual_seed(cell.seed)
    shapes = task.table_shapes(data, size)
    model = task.model(data, {s.name: make_table(Choice.full(), s)[0] for s in shapes}, size)
    path = _teacher_path(cell, cache_dir)
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    train(task, model, data, size, cell.seed, size["epochs"], size["lr"])
    if path is not None:
        _save_teacher(model, path)
    return model.eval()


def cell_record(cell: Cell) -> dict[str, Any]:
    """The fields every result record of ``cell`` starts with (whatever its status)."""
    return {"key": cell.key(), "task": cell.task, "procedure": cell.procedure, "label": cell.choice.label,
            "method": cell.choice.method, "target_ratio": cell.choice.ratio, "seed": cell.seed, "size": cell.size,
            "split_seed": cell.split_seed, "metric": TASKS[cell.task].metric}


def run_cell(cell: Cell, cache_dir: Path | None = None) -> dict[str, Any]:
    """Train and evaluate one cell; returns a JSON-ready record (status ok / unreachable / unavailable)."""
    task, size = TASKS[cell.task], SIZES[cell.size][cell.task]
    record = cell_record(cell)
    if cell.choice.method not in ("full", *FBGEMM_BASELINES) and cell.choice.method not in embcompress.list_methods():
        return {**record, "status": "unavailable", "reason": f"method {cell.choice.method!r} is not registered"}
    if cell.choice.method in FBGEMM_BASELINES and not fbgemm_available():
        return {**record, "status": "unavailable", "reason": "FBGEMM is not installed (requirements/torchrec.txt)"}
    data = prepared(cell.task, cell.size, cell.split_seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cell.seed)
    teacher = None
    shapes = task.table_shapes(data, size)
    if cell.procedure == "two-stage":
        teacher = _teacher(cell, data, cache_dir)
        # Stage 1 fits each compressed table to the trained dense table it replaces.
        for shape in shapes:
            shape.pretrained = getattr(teacher, task.table_attrs[shape.name]).weight.detach().clone()
        torch.manual_seed(cell.seed)
    tables, specs = {}, {}
    try:
        for shape in shapes:
            tables[shape.name], specs[shape.name] = make_table(cell.choice, shape, SIZES[cell.size]["fit"],
                                                               SIZES[cell.size]["base_specs"])
    except SpecError as exc:
        return {**record, "status": "unreachable", "reason": str(exc)}
    fit_seconds = time.perf_counter() - start
    model = task.model(data, tables, size)
    if teacher is not None:
        # The student starts as the trained dense model with its tables replaced (whole-model fine-tuning).
        attrs = set(task.table_attrs.values())
        state = {k: v for k, v in teacher.state_dict().items() if k.split(".")[0] not in attrs}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.split(".")[0] in attrs for k in missing), (missing, unexpected)
        result = stage2_distill(task, model, teacher, data, size, cell.seed, SIZES[cell.size]["distill"])
    else:
        result = train(task, model, data, size, cell.seed, size["epochs"], size["lr"])
        path = _teacher_path(cell, cache_dir)
        if cell.choice.method == "full" and path is not None:
            _save_teacher(model, path)  # task 5 distils from exactly this model
    metrics = task.evaluate(model, data, "test", size)
    per_table = {s.name: {"spec": specs[s.name], "rows": s.num_embeddings, "dim": s.embedding_dim,
                          "bytes": table_bytes(tables[s.name]), "dense_bytes": s.num_embeddings * s.embedding_dim * 4}
                 for s in shapes}
    total = sum(t["bytes"] for t in per_table.values())
    dense = sum(t["dense_bytes"] for t in per_table.values())
    return {**record, "status": "ok", "tables": per_table, "bytes": total, "dense_bytes": dense,
            "ratio": dense / total, "test": metrics, "score": metrics[task.metric], **result,
            "fit_seconds": round(fit_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2)}


def cell_from_dict(d: dict[str, Any]) -> Cell:
    return Cell(d["task"], Choice(**d["choice"]), d["seed"], d["size"], d["procedure"], d["split_seed"])


def cell_to_dict(cell: Cell) -> dict[str, Any]:
    return asdict(cell)
