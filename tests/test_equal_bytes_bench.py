"""Fast checks of benchmarks/equal_bytes.py: FAISS codecs' byte accounting and the best-of selection."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from benchmarks import equal_bytes as E

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss-cpu is not installed (pip install 'embcompress[bench]')")


@pytest.mark.parametrize("kind", E.FAISS)
@pytest.mark.parametrize("rows,dim,ratio", [(400_000, 50, 20), (30_522, 384, 40)])
def test_faiss_codec_is_the_most_code_bits_within_the_total_budget(kind, rows, dim, ratio):
    budget = int(rows * dim * 4 / ratio)
    factory, total, bits = E.faiss_factory(kind, rows, dim, budget)
    assert total <= budget
    books, nbits = (int(x) for x in factory.split(",")[-1].lstrip("OPQRLS").split("x"))
    assert bits == books * nbits
    # one more book (or, for PQ, the next divisor) at the same width would not fit
    if kind in ("faiss-rq", "faiss-lsq"):
        assert rows * math.ceil((books + 1) * nbits / 8) + 4 * (books + 1) * (dim << nbits) > budget


@needs_faiss
@pytest.mark.parametrize("kind", ["faiss-pq", "faiss-rq"])
def test_faiss_codec_stores_the_bytes_counted(kind):
    weight = torch.randn(600, 8)
    budget = 600 * 8 * 4 // 6
    approx, meta = E.fit_faiss(kind, weight, budget)
    assert approx.shape == (600, 8) and meta["bytes"] <= budget
    assert E.relative_mse(torch.from_numpy(approx), weight) < 1
    # scanned: every competitive width was fitted and the best kept
    assert meta["spec"] in meta["tried"] and meta["tried"][meta["spec"]] == min(meta["tried"].values())


def test_best_fit_keeps_the_least_error():
    weight = torch.randn(50, 4)
    fits = [lambda: (np.zeros((50, 4), np.float32), {"spec": "zeros"}),
            lambda: (weight.numpy() * 0.9, {"spec": "shrunk"})]
    approx, meta = E.best_fit(fits, weight)
    assert meta["spec"] == "shrunk" and set(meta["tried"]) == {"zeros", "shrunk"}
    with pytest.raises(ValueError, match="no setting"):
        E.best_fit([], weight)


def test_report_names_only_rows_fitted_with_other_effective_options(monkeypatch):
    monkeypatch.setattr(E, "FIT_OPTIONS", {"glove": {"codes": {"polish": 1}}})
    runs = [{"table": "glove", "ratio": 20.0, "method": "codes", "fit": {"polish": 1, "search": 4}},  # 4 = default
            {"table": "glove", "ratio": 40.0, "method": "codes", "fit": {"polish": 2}},
            {"table": "minilm", "ratio": 10.0, "method": "dpq", "fit": {}},
            {"table": "minilm", "ratio": 10.0, "method": "faiss-pq"}]
    assert E.stale_fits(runs) == 'glove 40x codes {"polish": 2}'


def test_report_lists_every_measure_where_faiss_is_ahead():
    entries = [{"table": "glove", "ratio": 40.0, "rel_mse_reduction": 0.05, "faiss_rel_mse": 0.35, "ours_rel_mse": 0.33,
                "ours_simlex": 0.13, "faiss_simlex": 0.15, "delta_simlex": -0.02, "delta_ws353": 0.05},
               {"table": "minilm", "ratio": 20.0, "rel_mse_reduction": -0.01, "faiss_rel_mse": 0.19,
                "ours_rel_mse": 0.192}]
    assert E.faiss_ahead(entries) == ("glove 40x SimLex 0.150 vs ours 0.130; "
                                      "minilm 20x rel MSE 0.1900 vs ours 0.1920")
    assert E.faiss_ahead([{**entries[0], "delta_simlex": 0.0}]) == "nowhere"
