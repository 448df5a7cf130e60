"""The five claim experiments: data, tables ("arms"), model, training and per-example scoring.

A cell is (claim, dataset, arm, learning rate, weight decay, seed). Every arm of a claim gets the
same hyperparameter grid (the tuning budget); training stops when validation has not improved for
``patience`` epochs and restores the best-validation epoch; the report picks each arm's grid point
by mean validation score over seeds. Test scores are kept per example (correctness, per-user nDCG,
per-segment NLL) for the paired bootstrap in :mod:`benchmarks.claims.stats`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import embcompress
from embcompress.budget import config_for_budget
from embcompress.config import parse_spec
from embcompress.methods.codes import CompositionalCodeEmbedding

from benchmarks.tasks import datasets as D
from benchmarks.tasks.tasks import ranking_gains

from . import data as C
from .models import HashWithBias, LSTMClassifier, MeanPoolMLP, NextItemModel, Popularity, WordLM

__all__ = ["Cell", "Comparison", "Experiment", "EXPERIMENTS", "SIZES", "settings", "run_cell", "table_bytes"]

# Per size and claim: data, model, training and the hyperparameter grid ("grid": (lr, weight decay)
# pairs, the same for every arm). "quick" is the CI smoke run (tiny data, one epoch).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "codes": dict(datasets=["rotten", "womens"], limit=300, max_len=24, hidden=16, batch=32, epochs=1,
                      patience=1, grid=[(2e-3, 0.0)], seeds=[0, 1], ae_steps=30, ae_lr=1e-3,
                      default_fit=dict(CompositionalCodeEmbedding.QUICK_FIT, polish=0, rounds=0, sample=2048)),
        "tt": dict(datasets=["womens"], limit=300, max_len=24, dim=256, vocab=25_000, hidden=8, layers=1,
                   dropout=0.5, batch=32, epochs=1, patience=1, grid=[(1e-3, 0.0)], seeds=[0, 1]),
        "dpq": dict(datasets=["topic", "lm"], limit=200, max_len=64, dim=32, hidden=16, batch=32, epochs=1,
                    patience=1, grid=[(1e-2, 0.0)], seeds=[0, 1], lm_vocab=1000, lm_tokens=(20_000, 4_000, 4_000),
                    lm_dim=32, lm_hidden=16, lm_layers=1, bptt=20, lm_batch=16, groups={"topic": 8, "lm": 8},
                    codewords=16),
        "memcom": dict(datasets=["movielens", "zipf"], users=200, dim=32, window=5, batch=512, epochs=1, patience=1,
                       grid=[(5e-3, 0.0)], seeds=[0, 1], zipf=dict(num_items=500, num_users=200, length=12)),
        "distill": dict(datasets=["lm"], vocab=1000, tokens=(20_000, 4_000, 4_000), dim=16, bptt=20, batch=16,
                        epochs=1, patience=1, finetune_epochs=1, grid=[(5e-3, 0.0)], seeds=[0, 1], ratio=8.0,
                        temperature=2.0, alpha=0.5, fit_steps=20),
    },
    "full": {
        # Sized from the measured plan (plan.json: CPU seconds per epoch at one torch thread) to about
        # 6 CPU hours if every cell ran to its epoch limit. "by_dataset" overrides a claim's settings
        # on one dataset. Where a cell would cost over 10 CPU minutes, 3 seeds instead of 5.
        "codes": dict(datasets=["rotten", "womens"], limit=None, max_len=64, hidden=150, batch=64, epochs=8,
                      patience=2, grid=[(1e-3, 0.0), (3e-3, 0.0)], seeds=[0, 1, 2, 3, 4], ae_steps=20_000,
                      ae_lr=1e-3, default_fit={},
                      # 33 CPU s per epoch at 64 tokens: 48 tokens, 6 epochs, 3 seeds.
                      by_dataset={"womens": dict(max_len=48, epochs=6, seeds=[0, 1, 2])}),
        # 128 CPU s per epoch on all 15.9k training reviews at 64 tokens: 6,000 reviews at 48 tokens.
        "tt": dict(datasets=["womens"], limit=6_000, max_len=48, dim=256, vocab=25_000, hidden=128, layers=2,
                   dropout=0.5, batch=64, epochs=8, patience=2, grid=[(1e-3, 0.0)], seeds=[0, 1, 2, 3, 4]),
        "dpq": dict(datasets=["topic", "lm"], limit=None, max_len=256, dim=128, hidden=128, batch=32, epochs=30,
                    patience=3, grid=[(3e-3, 0.0), (1e-2, 0.0)], seeds=[0, 1, 2, 3, 4], lm_vocab=10_000,
                    lm_tokens=(150_000, 40_000, 40_000), lm_dim=200, lm_hidden=200, lm_layers=2, bptt=35,
                    lm_batch=32, groups={"topic": 32, "lm": 25}, codewords=32,
                    # 139 CPU s per epoch at 400k training tokens: 150k, at most 5 epochs, one grid point.
                    by_dataset={"lm": dict(epochs=5, patience=1, grid=[(3e-3, 0.0)], seeds=[0, 1, 2])}),
        "memcom": dict(datasets=["movielens", "zipf"], users=None, dim=64, window=20, batch=256, epochs=10,
                       patience=2, grid=[(1e-3, 0.0), (1e-3, 1e-2), (3e-3, 0.0), (3e-3, 1e-2)],
                       seeds=[0, 1, 2, 3, 4], zipf=dict(num_items=5_000, num_users=1_000, length=40)),
        "distill": dict(datasets=["lm"], vocab=5_000, tokens=(150_000, 30_000, 30_000), dim=128, bptt=35, batch=32,
                        epochs=6, patience=1, finetune_epochs=3, grid=[(2e-3, 0.0), (5e-3, 0.0)],
                        seeds=[0, 1, 2, 3, 4], ratio=10.0, temperature=2.0, alpha=0.5, fit_steps=500),
    },
}


def settings(claim: str, dataset: str, size: str) -> dict[str, Any]:
    """A claim's settings on one dataset (its ``by_dataset`` overrides applied)."""
    cfg = dict(SIZES[size][claim])
    cfg.update(cfg.pop("by_dataset", {}).get(dataset, {}))
    return cfg


@dataclass(frozen=True)
class Cell:
    claim: str
    dataset: str
    arm: str
    lr: float
    wd: float
    seed: int
    size: str = "full"

    def key(self) -> str:
        return f"{self.claim}|{self.dataset}|{self.arm}|lr={self.lr:g},wd={self.wd:g}|{self.seed}"


@dataclass(frozen=True)
class Comparison:
    """The claim ``what``: ``arm``'s loss against ``reference`` (``measure`` of stats.MEASURES) is below
    ``tolerance``."""

    what: str
    arm: str
    reference: str
    measure: str
    tolerance: float


def table_bytes(table: nn.Module) -> int:
    """Deployed bytes: fp32 for a dense table, the exported artifact (or num_bytes) otherwise."""
    if isinstance(table, nn.Embedding):
        return table.weight.numel() * 4
    if hasattr(table, "export"):
        return int(table.export().num_bytes())
    return int(table.num_bytes())


class Experiment:
    """One claim: its arms, data, model and the paper-versus-ours record."""

    name = ""
    title = ""
    arms: list[str] = []
    comparisons: list[Comparison] = []
    setting: dict[str, str] = {}
    short: dict[str, str] = {}  # per dataset: our setting in a few words (the README table)

    def grid_for(self, arm: str, cfg: dict[str, Any]) -> list[tuple[float, float]]:
        return [cfg["grid"][0]] if arm == "popularity" else cfg["grid"]

    def cells(self, size: str) -> list[Cell]:
        out = []
        for ds in SIZES[size][self.name]["datasets"]:
            cfg = settings(self.name, ds, size)
            out += [Cell(self.name, ds, arm, lr, wd, seed, size) for arm in self.arms_for(ds)
                    for lr, wd in self.grid_for(arm, cfg) for seed in cfg["seeds"]]
        return out

    def arms_for(self, dataset: str) -> list[str]:
        return self.arms

    def prepare(self, dataset: str, cfg: dict[str, Any]) -> Any:
        raise NotImplementedError

    def build(self, cell: Cell, data: Any, cfg: dict[str, Any], cache: Path) -> tuple[nn.Module, nn.Module, str]:
        """(model, the compressed or dense table, its spec)."""
        raise NotImplementedError

    def batches(self, data: Any, cfg: dict[str, Any], generator: torch.Generator) -> Iterator[Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, split: str, cfg: dict[str, Any]) -> tuple[float, np.ndarray]:
        """(the split's score, per-example scores)."""
        raise NotImplementedError

    def dense_bytes(self, table: nn.Module) -> int:
        return table.num_embeddings * table.embedding_dim * 4


# --- text classification -----------------------------------------------------------------------

def _minibatches(inputs: torch.Tensor, labels: torch.Tensor, size: int,
                 generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over (inputs, labels) in batches of ``size``."""
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        yield inputs[idx], labels[idx]


def _cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


class _TextClassification(Experiment):
    def batches(self, data, cfg, generator):
        return _minibatches(*data["splits"].train, cfg["batch"], generator)

    def loss(self, model, batch):
        return _cross_entropy(model, batch)

    @torch.no_grad()
    def evaluate(self, model, data, split, cfg):
        ids, labels = getattr(data["splits"], split)
        preds = torch.cat([model(ids[s:s + 512]).argmax(1) for s in range(0, len(labels), 512)])
        correct = (preds == labels).float().numpy()
        return float(correct.mean()), correct


def _texts(dataset: str) -> tuple[list[str], list[int], list[str]]:
    if dataset == "rotten":
        return (*D.rotten_tomatoes_texts(), ["rotten", "fresh"])
    if dataset == "womens":
        return (*C.womens_reviews(), ["negative", "positive"])
    raise ValueError(f"unknown text dataset {dataset!r}; choose rotten or womens")


# float16 codebooks: at 32 x 16 x 300 they are 307 KB instead of 614 KB, which keeps the 11k-word
# Women's table >= 95% smaller (94.1% with float32); the paper's 75k-word table did not need it.
CODES_SPEC = "codes:books=32,codewords=16,codebook_dtype=float16"


class CodesClaim(_TextClassification):
    name = "codes"
    title = "Compositional codes: >= 95% smaller, no loss on sentiment"
    arms = ["dense", "codes-autoencoder", "codes-default"]
    short = {"rotten": "Rotten Tomatoes, fixed spaCy 300-d table, LSTM 150",
             "womens": "Women's reviews, fixed spaCy 300-d table, LSTM 150"}
    comparisons = [Comparison("codes 32x16 (paper's autoencoder fit) loses < 0.5 accuracy points",
                              "codes-autoencoder", "dense", "points", 0.5),
                   Comparison("codes 32x16 (library default fit) loses < 0.5 accuracy points",
                              "codes-default", "dense", "points", 0.5)]
    setting = {
        "paper": "Shu & Nakayama 2018: GloVe 300-d (75k words on IMDB) fixed in both models; LSTM 150 units; "
                 "IMDB reviews (~230 words); codes 32 x 16 from the Gumbel-softmax autoencoder "
                 "(200k steps, batch 128, Adam 1e-4); 98% smaller, no accuracy loss.",
        "ours": "spaCy en_core_web_md 300-d vectors fixed in both models, vocabulary = training words the table "
                "knows (others dropped); LSTM 150 units, final state, linear classifier; Rotten Tomatoes "
                "snippets (64 tokens, 5 seeds, at most 8 epochs) and Women's clothing reviews (4-5 vs 1-2 "
                "stars, ~60 words, 48 tokens kept, 3 seeds, at most 6 epochs); codes 32 x 16 fitted once per "
                "vocabulary (seed 0) with the paper's autoencoder alone (fit procedure='autoencoder') or the "
                "library's default fit, then fixed with their codebooks; AdamW, lr from {1e-3, 3e-3} on "
                "validation, early stopping (patience 2).",
        "differs": "Smaller vocabularies (17k and 11k words), so the codebooks weigh more: stored as float16 "
                   "(fitted in float32) to stay >= 95% smaller; reviews shorter than IMDB's; the autoencoder "
                   "trained 20k steps at lr 1e-3 instead of 200k at 1e-4; Women's "
                   "reviews cut to 48 tokens and 3 seeds (CPU budget: 33 CPU s per epoch at 64 tokens).",
    }

    def prepare(self, dataset, cfg):
        texts, labels, classes = _texts(dataset)
        splits, weight = C.known_word_splits(texts, labels, classes, 0, cfg["max_len"], limit=cfg["limit"])
        return {"splits": splits, "weight": weight}

    def _fitted(self, arm: str, dataset: str, weight: torch.Tensor, cfg: dict[str, Any], cache: Path,
                size: str) -> nn.Module:
        from safetensors.torch import load_file, save_file

        config = parse_spec(CODES_SPEC)
        path = cache / f"codes-{dataset}-{arm}-{size}.safetensors"
        if not path.exists():
            if arm == "codes-autoencoder":
                options = dict(procedure="autoencoder", steps=cfg["ae_steps"], batch_size=128, lr=cfg["ae_lr"])
            else:
                options = dict(cfg["default_fit"])
            start = time.process_time()
            # Fitted with float32 codebooks; stored as float16 (the module rounds them in its forward).
            fitted = embcompress.from_pretrained(weight, config.replace(codebook_dtype="float32"), padding_idx=D.PAD,
                                                 seed=0, progress=False, **options)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"codes": fitted.codes.contiguous(), "codebooks": fitted.codebooks.detach().contiguous(),
                       "fit_cpu_seconds": torch.tensor([time.process_time() - start])}, str(tmp))
            tmp.replace(path)
        saved = load_file(str(path))
        table = CompositionalCodeEmbedding(weight.shape[0], weight.shape[1], config, padding_idx=D.PAD,
                                           layout={"state": "fixed"})
        table.codes.copy_(saved["codes"])
        table.codebooks.data.copy_(saved["codebooks"])
        table.requires_grad_(False)  # the paper fixes the code table like the dense one
        return table

    def build(self, cell, data, cfg, cache):
        weight = data["weight"]
        if cell.arm == "dense":
            table, spec = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=D.PAD), "full (fixed)"
        else:
            table = self._fitted(cell.arm, cell.dataset, weight, cfg, cache, cell.size)
            spec = table.config.to_spec()
        return LSTMClassifier(table, weight.shape[1], cfg["hidden"], 2), table, spec


class TTClaim(_TextClassification):
    name = "tt"
    title = "Tensor-train: ~100x smaller, at most 1 point lost"
    arms = ["dense", "tt"]
    short = {"womens": "Women's reviews, d = 256 from scratch, 2-layer BiLSTM 128"}
    comparisons = [Comparison("TT (3 cores, rank 16) loses at most 1 accuracy point", "tt", "dense", "points", 1.0)]
    setting = {
        "paper": "Hrinchuk et al. 2020 (TT-embeddings), sentiment: IMDB, d = 256, vocabulary 25k, 2-layer BiLSTM "
                 "128, dropout 0.5, Adam 1e-3, both tables from random init, TT with 3 cores rank 16 (~93x).",
        "ours": "Women's clothing reviews (4-5 vs 1-2 stars), 6,000 training reviews, 48 tokens kept, d = 256, "
                "vocabulary = their words (at most 25k), 2-layer BiLSTM 128, dropout 0.5, Adam 1e-3 (the paper's, "
                "one grid point for both), both tables from random init, early stopping (patience 2, at most 8 "
                "epochs), 5 seeds; tt:cores=3,rank=16.",
        "differs": "A smaller vocabulary than IMDB's 25k (so a lower compression ratio at rank 16), reviews "
                   "shorter than IMDB's, 6,000 of the 15.9k training reviews (CPU budget: 128 CPU s per epoch "
                   "on all of them at 64 tokens).",
    }

    def prepare(self, dataset, cfg):
        texts, labels, classes = _texts(dataset)
        tokens = [D.tokenize(t) for t in texts]
        train, val, test = D.split_indices(len(texts), 0)
        if cfg["limit"] is not None:  # fewer training reviews; validation and test stay whole
            train = train[:cfg["limit"]]
        vocab = D.Vocab.build([tokens[i] for i in train], max_size=cfg["vocab"])
        y = torch.tensor(labels, dtype=torch.long)

        def part(idx):
            return D._pad([vocab.encode(tokens[i]) for i in idx], cfg["max_len"]), y[idx]

        return {"splits": D.TextSplits(vocab, classes, part(train), part(val), part(test))}

    def build(self, cell, data, cfg, cache):
        rows, dim = len(data["splits"].vocab), cfg["dim"]
        if cell.arm == "dense":
            table, spec = nn.Embedding(rows, dim, padding_idx=D.PAD), "full"
        else:
            config = parse_spec("tt:cores=3,rank=16")
            table, spec = embcompress.build(config, rows, dim, padding_idx=D.PAD), config.to_spec()
        model = LSTMClassifier(table, dim, cfg["hidden"], 2, layers=cfg["layers"], bidirectional=True,
                               dropout=cfg["dropout"])
        return model, table, spec


# --- DPQ: topic classification and language model ------------------------------------------------

class DPQClaim(Experiment):
    name = "dpq"
    title = "DPQ: >= 14x smaller at negligible loss"
    arms = ["dense", "dpq-sx", "dpq-vq"]
    short = {"topic": "BBC topics (deduplicated), mean pooling + hidden layer, d = 128",
             "lm": "word LM, 150k tokens, 10k vocabulary, 2-layer LSTM 200"}
    # "auto": < 0.5 accuracy points on topics, < 2% perplexity on the LM (measure_for).
    comparisons = [Comparison("DPQ-SX (K 32) at negligible loss", "dpq-sx", "dense", "auto", 0.0),
                   Comparison("DPQ-VQ (K 32) at negligible loss", "dpq-vq", "dense", "auto", 0.0)]
    setting = {
        "paper": "Chen et al. 2020 (DPQ): PTB LM (~1M tokens, 10k vocabulary), 2-layer LSTM 200 (small model) "
                 "trained to convergence, SX and VQ at their K x D grid; text classification (AG News, ...) "
                 "with mean pooling + one hidden layer; >= 14x at negligible loss.",
        "ours": "Topic: deduplicated BBC News (2,125 articles, 5 topics), 256 tokens, d = 128, mean pooling + "
                "one hidden layer of 128, lr from {3e-3, 1e-2}, early stopping (patience 3, at most 30 epochs), "
                "5 seeds; LM: BBC News (deduplicated) + Lee + Wikipedia text split by document, 10k "
                "vocabulary, 150k training tokens, 2-layer LSTM 200, dropout 0.3, bptt 35, lr 3e-3, early "
                "stopping (patience 1, at most 5 epochs), 3 seeds; DPQ with K = 32 codewords and D = 32 groups "
                "(topic) or 25 (LM, d = 200).",
        "differs": "150k of the ~1.6M available LM tokens and at most 5 epochs (CPU budget: 139 CPU s per epoch "
                   "at 400k), BBC topics (2k articles) instead of AG News (120k); ratios follow from K and D "
                   "on these smaller vocabularies.",
    }

    def measure_for(self, dataset: str) -> tuple[str, float]:
        return ("perplexity", 2.0) if dataset == "lm" else ("points", 0.5)

    def prepare(self, dataset, cfg):
        if dataset == "topic":
            return {"splits": D.bbc_news(0, max_len=cfg["max_len"], min_count=2, limit=cfg["limit"])}
        return {"lm": D.lm_corpus(0, vocab_size=cfg["lm_vocab"], max_tokens=cfg["lm_tokens"])}

    def _table(self, arm: str, rows: int, dim: int, groups: int, cfg: dict[str, Any]) -> tuple[nn.Module, str]:
        if arm == "dense":
            return nn.Embedding(rows, dim), "full"
        config = parse_spec(f"dpq:variant={arm.split('-')[1]},groups={groups},codewords={cfg['codewords']}")
        return embcompress.build(config, rows, dim), config.to_spec()

    def build(self, cell, data, cfg, cache):
        if cell.dataset == "topic":
            splits = data["splits"]
            table, spec = self._table(cell.arm, len(splits.vocab), cfg["dim"], cfg["groups"]["topic"], cfg)
            return MeanPoolMLP(table, cfg["dim"], cfg["hidden"], len(splits.classes)), table, spec
        lm = data["lm"]
        table, spec = self._table(cell.arm, len(lm.vocab), cfg["lm_dim"], cfg["groups"]["lm"], cfg)
        return WordLM(table, cfg["lm_dim"], len(lm.vocab), cfg["lm_hidden"], cfg["lm_layers"]), table, spec

    def batches(self, data, cfg, generator):
        if "splits" in data:
            return _minibatches(*data["splits"].train, cfg["batch"], generator)
        return _lm_batches(data["lm"], cfg["bptt"], cfg["lm_batch"], generator)

    def loss(self, model, batch):
        return _lm_loss(model, batch) if isinstance(model, WordLM) else _cross_entropy(model, batch)

    def evaluate(self, model, data, split, cfg):
        if "splits" in data:
            return _TextClassification.evaluate(self, model, data, split, cfg)
        return _lm_evaluate(model, getattr(data["lm"], split), cfg["bptt"])

    def score_is_higher_better(self, dataset: str) -> bool:
        return dataset != "lm"


def _lm_batches(lm: D.LMSplits, bptt: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Random windows of bptt + 1 tokens, one pass's worth per epoch (the task grid's sampling)."""
    span = bptt + 1
    for _ in range(max(1, len(lm.train) // (batch * bptt))):
        starts = torch.randint(0, len(lm.train) - span, (batch,), generator=generator)
        yield lm.train[starts.unsqueeze(1) + torch.arange(span)]


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


SEGMENT = 100  # tokens per test "example" of a language model (the bootstrap's unit)


@torch.no_grad()
def _lm_evaluate(model: nn.Module, stream: torch.Tensor, bptt: int) -> tuple[float, np.ndarray]:
    """Perplexity of the stream (16 parallel rows, state carried) and the mean NLL of each
    ``SEGMENT``-token stretch of it."""
    rows = 16
    width = (len(stream) - 1) // rows // SEGMENT * SEGMENT
    inputs = stream[:rows * width].view(rows, width)
    targets = stream[1:rows * width + 1].view(rows, width)
    state, nll = None, []
    for s in range(0, width, bptt):
        logits, state = model(inputs[:, s:s + bptt], state)
        target = targets[:, s:s + bptt]
        nll.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="none").view(rows, -1))
    segments = torch.cat(nll, 1).reshape(-1, SEGMENT).mean(1).numpy()
    return float(math.exp(segments.mean())), segments


# --- MEmCom: next-item prediction with a compressed input table ----------------------------------

class MEmComClaim(Experiment):
    name = "memcom"
    title = "MEmCom: <= 4% relative nDCG loss at 16x, better than hashing"
    arms = ["dense", "memcom", "hash", "hash-bias", "popularity"]
    short = {"movielens": "MovieLens-100K next item, compressed input item table, d = 64",
             "zipf": "Zipfian 5k-item stand-in, next item, d = 64"}
    comparisons = [Comparison("MEmCom at 16x loses <= 4% relative nDCG@10", "memcom", "dense", "relative", 4.0),
                   Comparison("MEmCom beats hashing at 16x (nDCG@10)", "memcom", "hash", "relative", 0.0),
                   Comparison("MEmCom beats hashing with a per-row bias at 16x", "memcom", "hash-bias", "relative",
                              0.0)]
    setting = {
        "paper": "Pansare et al. 2022 (MEmCom): the input ID table of large recommendation / classification "
                 "models (millions of IDs, long-tailed) compressed, output side dense; <= 4% relative nDCG loss "
                 "at 16x, better than the hashing trick.",
        "ours": "Next-item prediction: mean of the last 20 items' input vectors (the compressed table), a tanh "
                "layer, a dense output item table with softmax over all items; d = 64; MovieLens-100K (1,682 "
                "items, leave-last-out per user, seen items excluded) and a Zipfian stand-in (5,000 items, "
                "exponent 1, 1,000 users x 40 steps with topic structure); arms at 16x of the input table: "
                "memcom, hash, hash + per-row bias; popularity as the floor; lr {1e-3, 3e-3} x weight decay "
                "{0, 1e-2} for every arm, early stopping (patience 2, at most 10 epochs), 5 seeds.",
        "differs": "Thousands of IDs instead of millions, so collisions at 16x are denser than in the paper's "
                   "tables; the stand-in's long tail is synthetic.",
    }

    def prepare(self, dataset, cfg):
        if dataset == "movielens":
            seq = C.movielens_sequences(cfg["window"])
            seq.sequences = seq.sequences[:cfg["users"]]
            exclude = True
        else:
            seq = C.zipf_sequences(window=cfg["window"], **cfg["zipf"])
            exclude = False  # items repeat in the stand-in: a seen item can be the next one
        train = seq.examples("train")
        counts = torch.bincount(train[1], minlength=seq.num_items)
        return {"seq": seq, "train": train, "val": seq.examples("val"), "test": seq.examples("test"),
                "seen": {s: seq.seen(s) for s in ("val", "test")} if exclude else None, "counts": counts}

    def build(self, cell, data, cfg, cache):
        items, dim = data["seq"].num_items, cfg["dim"]
        rows = items + 1  # + the padding row of short histories
        if cell.arm == "popularity":
            return Popularity(data["counts"]), nn.Embedding(0, dim), "popularity"
        if cell.arm == "dense":
            table, spec = nn.Embedding(rows, dim, padding_idx=items), "full"
        elif cell.arm == "hash-bias":
            budget = rows * dim * 4 // 16
            buckets = (budget - 4 * rows) // (4 * dim)
            config = parse_spec(f"hash:buckets={buckets}")
            table = HashWithBias(embcompress.build(config, rows, dim, padding_idx=items), rows, items)
            spec = config.to_spec() + " + per-row bias"
        else:
            config = config_for_budget(cell.arm, rows, dim, ratio=16.0)
            table, spec = embcompress.build(config, rows, dim, padding_idx=items), config.to_spec()
        return NextItemModel(table, dim, items), table, spec

    def dense_bytes(self, table):
        return 0 if isinstance(table, nn.Embedding) and table.num_embeddings == 0 else super().dense_bytes(
            table.hashed if isinstance(table, HashWithBias) else table)

    def batches(self, data, cfg, generator):
        return _minibatches(*data["train"], cfg["batch"], generator)

    def loss(self, model, batch):
        return _cross_entropy(model, batch)

    @torch.no_grad()
    def evaluate(self, model, data, split, cfg):
        history, target = data[split]
        scores = torch.cat([model(history[s:s + 1024]) for s in range(0, len(target), 1024)])
        if data["seen"] is not None:
            for user, seen in enumerate(data["seen"][split]):
                scores[user, seen] = -math.inf
        ndcg, _ = ranking_gains(scores, target, k=10)
        ndcg = ndcg.numpy()
        return float(ndcg.mean()), ndcg


# --- Distilled embedding: tied LM, stage-1 fit + stage-2 KD ------------------------------------------

class DistillClaim(Experiment):
    name = "distill"
    title = "Distilled embedding: better than low-rank at equal bytes"
    arms = ["dense", "distilled-kd", "lowrank", "lowrank-kd"]
    short = {"lm": "tied word LM, d = 128, 150k tokens, 10x"}
    comparisons = [Comparison("distilled (stage 1 + KD) beats low-rank (SVD + fine-tuning) at equal bytes",
                              "distilled-kd", "lowrank", "perplexity", 0.0),
                   Comparison("ablation: distilled + KD beats low-rank + KD at equal bytes",
                              "distilled-kd", "lowrank-kd", "perplexity", 0.0)]
    setting = {
        "paper": "Lioutas et al. 2020 (Distilled embedding): tied input/output embeddings (NMT and LM); stage 1 "
                 "fits a non-linear low-rank autoencoder to the trained table, stage 2 fine-tunes with "
                 "knowledge distillation from the uncompressed model; baseline: SVD then fine-tuning.",
        "ours": "Word LSTM LM with tied input/output table (d = hidden = 128, 1 layer), BBC (deduplicated) + "
                "Lee + Wikipedia, 5k vocabulary, 150k training tokens; the dense model (at most 6 epochs, lr on "
                "validation) is each seed's teacher; distilled (ReLU, 500-step stage-1 fit) and lowrank "
                "(truncated SVD) at 10x; stage 2 up to 3 epochs with early stopping (the start counts): "
                "distilled with KD (T = 2, alpha 0.5), lowrank without KD (the paper's baseline) and with KD "
                "(ablation); lr from {2e-3, 5e-3} for every arm; 5 seeds.",
        "differs": "A small LM instead of NMT / large LMs; 150k training tokens (CPU budget).",
    }

    def prepare(self, dataset, cfg):
        return {"lm": D.lm_corpus(0, vocab_size=cfg["vocab"], max_tokens=cfg["tokens"])}

    def _dense_model(self, data, cfg):
        vocab, dim = len(data["lm"].vocab), cfg["dim"]
        return WordLM(nn.Embedding(vocab, dim), dim, vocab, dim, tied=True)

    def teacher(self, cell: Cell, data: Any, cfg: dict[str, Any], cache: Path) -> nn.Module:
        """The trained dense model of ``cell.seed`` at the grid point with the best validation score
        (cached by the dense cells); trained here at the first grid point if none is cached."""
        from safetensors.torch import load_file

        best, best_val = None, math.inf
        for lr, wd in cfg["grid"]:
            path = _teacher_path(cache, cell.size, lr, wd, cell.seed)
            if path.exists():
                state = load_file(str(path))
                val = float(state.pop("__val__"))
                if val < best_val:
                    best, best_val = state, val
        model = self._dense_model(data, cfg)
        if best is None and getattr(self, "measuring", False):
            return model.eval()  # a cost measurement: any teacher costs the same per batch
        if best is None:
            dense = Cell(self.name, cell.dataset, "dense", *cfg["grid"][0], cell.seed, cell.size)
            train_cell(self, dense, model, data, cfg, cache)
        else:
            model.load_state_dict(best)
        return model.eval()

    def build(self, cell, data, cfg, cache):
        if cell.arm == "dense":
            model = self._dense_model(data, cfg)
            return model, model.table, "full"
        teacher = self.teacher(cell, data, cfg, cache)
        vocab, dim = len(data["lm"].vocab), cfg["dim"]
        method = cell.arm.split("-")[0]
        config = config_for_budget(method, vocab, dim, ratio=cfg["ratio"])
        options = {"steps": cfg["fit_steps"]} if method == "distilled" else {}
        table = embcompress.from_pretrained(teacher.table.weight.detach(), config, **options)
        model = WordLM(table, dim, vocab, dim, tied=True)
        state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("table.")}
        model.load_state_dict(state, strict=False)
        if cell.arm.endswith("-kd"):
            model.teacher = [teacher]  # a list: not a submodule, so not trained or saved
        return model, table, config.to_spec()

    def batches(self, data, cfg, generator):
        return _lm_batches(data["lm"], cfg["bptt"], cfg["batch"], generator)

    def loss(self, model, batch):
        if not hasattr(model, "teacher"):
            return _lm_loss(model, batch)
        cfg_t, alpha = self.kd
        logits, _ = model(batch[:, :-1])
        with torch.no_grad():
            teacher_logits, _ = model.teacher[0](batch[:, :-1])
        v = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, v), batch[:, 1:].reshape(-1))
        kd = F.kl_div(F.log_softmax(logits.reshape(-1, v) / cfg_t, -1),
                      F.log_softmax(teacher_logits.reshape(-1, v) / cfg_t, -1),
                      log_target=True, reduction="batchmean") * cfg_t ** 2
        return alpha * kd + (1 - alpha) * ce

    def evaluate(self, model, data, split, cfg):
        return _lm_evaluate(model, getattr(data["lm"], split), cfg["bptt"])

    def score_is_higher_better(self, dataset: str) -> bool:
        return False


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (MEmComClaim(), DPQClaim(), CodesClaim(), DistillClaim(),
                                                           TTClaim())}

_PREPARED: dict[tuple[str, str, str], Any] = {}


def prepared(claim: str, dataset: str, size: str) -> Any:
    key = (claim, dataset, size)
    if key not in _PREPARED:
        _PREPARED[key] = EXPERIMENTS[claim].prepare(dataset, settings(claim, dataset, size))
    return _PREPARED[key]


def higher_is_better(claim: str, dataset: str) -> bool:
    exp = EXPERIMENTS[claim]
    return exp.score_is_higher_better(dataset) if hasattr(exp, "score_is_higher_better") else True


# --- training one cell -----------------------------------------------------------------------------

def train_cell(exp: Experiment, cell: Cell, model: nn.Module, data: Any, cfg: dict[str, Any], cache: Path,
               max_batches: int | None = None) -> dict[str, Any]:
    """Adam(W) with early stopping on validation; restores the best epoch. ``max_batches`` (a plan
    measurement) stops after that many batches of one epoch and reports the per-batch time."""
    generator = torch.Generator().manual_seed(cell.seed)
    higher = higher_is_better(cell.claim, cell.dataset)
    params = [p for p in model.parameters() if p.requires_grad]
    finetune = cell.claim == "distill" and cell.arm != "dense"
    epochs = cfg["finetune_epochs"] if finetune else cfg["epochs"]
    if isinstance(exp, DistillClaim):
        exp.kd = (cfg["temperature"], cfg["alpha"])
    if not params:  # popularity: nothing to train
        val, _ = exp.evaluate(model.eval(), data, "val", cfg)
        return {"val": val, "val_history": [val], "best_epoch": 0, "epoch_cpu_seconds": []}
    optimizer = torch.optim.AdamW(params, lr=cell.lr, weight_decay=cell.wd)
    best, best_state, best_epoch, history, epoch_cpu = None, None, 0, [], []
    if finetune:  # the starting point (stage 1 / SVD) is a candidate too
        best = exp.evaluate(model.eval(), data, "val", cfg)[0]
        best_state, history = copy.deepcopy(model.state_dict()), [best]
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.process_time()
        for n, batch in enumerate(exp.batches(data, cfg, generator), start=1):
            loss = exp.loss(model, batch) + embcompress.aux_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            if max_batches is not None and n >= max_batches:
                return {"batch_cpu_seconds": (time.process_time() - start) / n,
                        "batches_per_epoch": sum(1 for _ in exp.batches(data, cfg, torch.Generator().manual_seed(0)))}
        model.eval()
        val = exp.evaluate(model, data, "val", cfg)[0]
        epoch_cpu.append(round(time.process_time() - start, 2))
        history.append(val)
        if best is None or (val > best if higher else val < best):
            best, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg["patience"]:
            break
    model.load_state_dict(best_state)
    model.eval()
    if cell.claim == "distill" and cell.arm == "dense":
        _save_teacher(model, best, _teacher_path(cache, cell.size, cell.lr, cell.wd, cell.seed))
    return {"val": best, "val_history": history, "best_epoch": best_epoch, "epoch_cpu_seconds": epoch_cpu}


def _teacher_path(cache: Path, size: str, lr: float, wd: float, seed: int) -> Path:
    return cache / f"distill-dense-{size}-lr{lr:g}-wd{wd:g}-seed{seed}.safetensors"


def _save_teacher(model: nn.Module, val: float, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**state, "__val__": torch.tensor([val])}, str(tmp))
    tmp.replace(path)


def cell_record(cell: Cell) -> dict[str, Any]:
    return {"key": cell.key(), "claim": cell.claim, "dataset": cell.dataset, "arm": cell.arm, "lr": cell.lr,
            "wd": cell.wd, "seed": cell.seed, "size": cell.size}


def run_cell(cell: Cell, cache: Path, max_batches: int | None = None) -> dict[str, Any]:
    """Train and test one cell; a JSON-ready record with per-example test scores."""
    exp, cfg = EXPERIMENTS[cell.claim], settings(cell.claim, cell.dataset, cell.size)
    data = prepared(cell.claim, cell.dataset, cell.size)
    wall, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(cell.seed)
    exp.measuring = max_batches is not None
    model, table, spec = exp.build(cell, data, cfg, cache)
    build_cpu = time.process_time() - cpu
    result = train_cell(exp, cell, model, data, cfg, cache, max_batches)
    record = {**cell_record(cell), "spec": spec, "build_cpu_seconds": round(build_cpu, 2)}
    if max_batches is not None:
        return {**record, "status": "measured", **result}
    score, examples = exp.evaluate(model, data, "test", cfg)
    dense = exp.dense_bytes(table)
    nbytes = 0 if cell.arm == "popularity" else table_bytes(table)
    return {**record, "status": "ok", **result, "test": score, "examples": [round(float(x), 5) for x in examples],
            "bytes": nbytes, "dense_bytes": dense, "ratio": dense / nbytes if nbytes else None,
            "seconds": round(time.perf_counter() - wall, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
