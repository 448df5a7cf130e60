"""Default post hoc fits schedule bounded work at the largest benchmark shape (no timing: the work itself).

Each test runs a method's real fit on a 50,000 x 1,024 table at the budget rule's choice for 10x
and 40x, and stops it where the expensive stage starts, recording what that stage was asked to do.
"""

import pytest
import torch

import embcompress.kmeans as kmeans_module
import embcompress.methods.codes as codes_module
import embcompress.methods.dpq as dpq_module
import embcompress.methods.pq as pq_module
from embcompress import get_method
from embcompress.budget import config_for_budget
from embcompress.kmeans import MIN_FIT_ROWS, POINTS_PER_CENTROID, SEED_POINTS_PER_CENTROID, fit_sample, kmeans

ROWS, DIM = 50_000, 1_024
RATIOS = [10.0, 40.0]
#: Multiply-adds of the k-means start: iterations x fit rows x d x K (measured pq at 10x, 512 groups x
#: 64 codewords: 2.7e10, about 25 CPU s with encoding every row).
KMEANS_WORK = 3e10
#: Scores computed by the DPQ refinement: steps x rows per step x groups x codewords.
REFINE_SCORES = 200 * dpq_module.MAX_STEP_SCORES


class Stop(Exception):
    """Raised by a recorder once the scheduled work is known."""


@pytest.fixture(scope="module")
def weight():
    return torch.zeros(ROWS, DIM)


def record_kmeans(monkeypatch, module, seen):
    def recorder(x, k, iters=20, sample=65536, seed=0, weights=None):
        seen.update(rows=x.shape[-2], width=x.shape[-1], groups=x.shape[0] if x.dim() == 3 else 1, k=k, iters=iters,
                    sample=sample)
        raise Stop

    monkeypatch.setattr(module, "kmeans", recorder)


def kmeans_work(seen):
    return seen["iters"] * min(seen["rows"], seen["sample"]) * seen["groups"] * seen["width"] * seen["k"]


@pytest.mark.parametrize("ratio", RATIOS)
def test_pq_default_fit_runs_k_means_on_a_bounded_sample(monkeypatch, weight, ratio):
    config = config_for_budget("pq", ROWS, DIM, ratio=ratio)
    seen = {}
    record_kmeans(monkeypatch, pq_module, seen)
    with pytest.raises(Stop):
        pq_module.ProductQuantizedEmbedding(ROWS, DIM, config).fit(weight, seed=0)
    assert seen["sample"] == fit_sample(config.codewords) <= max(MIN_FIT_ROWS, POINTS_PER_CENTROID * config.codewords)
    assert kmeans_work(seen) <= KMEANS_WORK, seen


@pytest.mark.parametrize("ratio", RATIOS)
def test_dpq_default_fit_bounds_its_start_and_its_refinement(monkeypatch, weight, ratio):
    config = config_for_budget("dpq", ROWS, DIM, ratio=ratio)
    seen = {}
    record_kmeans(monkeypatch, dpq_module, seen)
    table = dpq_module.DPQEmbedding(ROWS, DIM, config)
    with pytest.raises(Stop):
        table.fit(weight, seed=0)
    assert kmeans_work(seen) <= KMEANS_WORK, seen

    def refine(weight, steps, batch_size, lr, seed, progress, row_weights=None):
        seen.update(steps=steps, batch_size=batch_size)
        raise Stop

    monkeypatch.setattr(table, "_start_from_kmeans", lambda *args: None)
    monkeypatch.setattr(table, "_error", lambda weight, row_weights=None, codes=None: 0.0)
    monkeypatch.setattr(table, "_refine", refine)
    with pytest.raises(Stop):
        table.fit(weight, seed=0)
    assert seen["steps"] * seen["batch_size"] * config.groups * config.codewords <= REFINE_SCORES, seen
    assert seen["batch_size"] >= 256  # still a useful batch


@pytest.mark.parametrize("ratio", [4.0, 10.0, 20.0, 40.0])
@pytest.mark.parametrize("shape", [(20_000, 300), (30_000, 384), (ROWS, DIM)])
def test_codes_budget_rule_keeps_books_within_the_fit_work_bound(ratio, shape):
    rows, dim = shape
    config = config_for_budget("codes", rows, dim, ratio=ratio)
    work = codes_module.fit_work(rows, dim, config.books, config.codewords)
    assert config.books <= codes_module.max_books(rows, dim, config.codewords)
    assert work <= codes_module.MAX_FIT_WORK or config.books == 1, (config, work)


def test_codes_fit_time_raises_the_books_cap_until_the_budget_binds():
    """GloVe's 400,000 x 50 at 10x: the default bound leaves a third of the budget unused; twice the fit time
    buys the books the bytes allow, and more fit time changes nothing. Other methods ignore it."""
    rows, dim = 400_000, 50
    default, doubled, more = (config_for_budget("codes", rows, dim, ratio=10, fit_time=t) for t in (1, 2, 8))
    assert (default.books, default.codewords) == (14, 128)
    assert doubled.books > default.books and doubled == more
    size = get_method("codes").expected_bytes(doubled, rows, dim)
    assert 0.95 * rows * dim * 4 / 10 < size <= rows * dim * 4 / 10
    assert codes_module.fit_work(rows, dim, doubled.books, doubled.codewords) <= 2 * codes_module.MAX_FIT_WORK
    assert config_for_budget("pq", rows, dim, ratio=10, fit_time=8) == config_for_budget("pq", rows, dim, ratio=10)
    for bad in (0, -1.0, float("nan"), float("inf"), "4"):
        with pytest.raises(ValueError, match="fit_time must be a positive finite number"):
            config_for_budget("codes", rows, dim, ratio=10, fit_time=bad)


@pytest.mark.parametrize("ratio", RATIOS)
def test_codes_default_fit_starts_on_at_most_its_sample(monkeypatch, weight, ratio):
    config = config_for_budget("codes", ROWS, DIM, ratio=ratio)
    seen = {}

    def recorder(x, books, codewords, beam=1, iters=15, seed=0, weights=None):
        seen.update(rows=x.shape[0], books=books, codewords=codewords)
        raise Stop

    monkeypatch.setattr(codes_module, "residual_kmeans", recorder)
    with pytest.raises(Stop):
        codes_module.CompositionalCodeEmbedding(ROWS, DIM, config).fit(weight, seed=0)
    assert seen["rows"] <= codes_module.CodesFit().sample and seen["books"] == config.books


def test_kmeans_seeds_and_iterates_on_bounded_rows(monkeypatch):
    seeded, assigned = [], []
    plus_plus, assign = kmeans_module._plus_plus, kmeans_module.assign
    monkeypatch.setattr(kmeans_module, "_plus_plus", lambda x, *a: seeded.append(x.shape[1]) or plus_plus(x, *a))
    monkeypatch.setattr(kmeans_module, "assign",
                        lambda x, c, *layout: assigned.append(x.shape[1]) or assign(x, c, *layout))
    k = 2 * MIN_FIT_ROWS // SEED_POINTS_PER_CENTROID  # seeding samples past the floor
    x = torch.randn(1, 100_000, 2)
    centroids, codes = kmeans(x, k, iters=2, sample=fit_sample(k), seed=0)
    assert seeded == [SEED_POINTS_PER_CENTROID * k] and fit_sample(k) == 65536
    assert assigned == [65536] * 2 + [x.shape[1]]  # Lloyd on the sample, then every row coded
    assert centroids.shape == (1, k, 2) and codes.shape == (1, x.shape[1])
    # Every row gets its nearest centroid.
    nearest = kmeans_module.squared_distances(x, centroids).argmin(-1)
    assert (codes == nearest).float().mean() > 0.999
