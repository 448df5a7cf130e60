"""Tensor-train embeddings: shapes, initialization, TT-SVD, fast lookup, frozen format, bytes."""

import math

import pytest
import torch

import embcompress
from embcompress import SpecError
from embcompress.frozen import FrozenTensorTrain
from embcompress.methods.tt import TensorTrainEmbedding, TTConfig, auto_vocab_shape, best_factorization, tt_svd


def naive_table(cores, vocab_shape, dim_shape, rows):
    """Full V' x d reconstruction by one einsum over all cores, cut to the real rows."""
    n = len(cores)
    letters = "abcdefgh"
    terms = [f"{letters[k]}{'ABCDEFGH'[k]}{'ijklmnop'[k]}{letters[k + 1]}" for k in range(n)]
    out = "".join("ABCDEFGH"[k] for k in range(n)) + "".join("ijklmnop"[k] for k in range(n))
    full = torch.einsum(",".join(terms) + "->" + out, *cores)  # (v_1..v_n, d_1..d_n)
    return full.reshape(math.prod(vocab_shape), math.prod(dim_shape))[:rows]


def test_auto_shapes_are_balanced_and_pad_when_cheaper():
    assert best_factorization(128, 3) == (4, 4, 8)
    assert best_factorization(256, 4) == (4, 4, 4, 4)
    assert auto_vocab_shape(10**6, 3) == (100, 100, 100)
    assert auto_vocab_shape(97, 3) == (4, 5, 5)  # 97 is prime: pad to 100
    assert auto_vocab_shape(25_000, 3) == (25, 25, 40)  # no padding: sum 90 < 95 for 25x30x40
    assert auto_vocab_shape(25_000, 4) == (10, 10, 15, 20)  # 30,000: same sum 55, more balanced
    table = embcompress.build("tt:cores=3,rank=8", 97, 24)
    assert sorted(table.vocab_shape) == [4, 5, 5] and sorted(table.dim_shape) == [2, 3, 4]
    # The smallest v_k d_k goes in the middle, where slices cost r^2.
    products = [v * x for v, x in zip(table.vocab_shape, table.dim_shape)]
    assert products[1] == min(products)


def test_resolved_shapes_are_stored_and_reused(tmp_path):
    table = embcompress.build("tt:cores=3,rank=4", 97, 24).eval()
    layout = table.layout()
    assert layout == {"vocab_shape": table.vocab_shape, "dim_shape": table.dim_shape}
    # A different (valid) stored layout wins over what "auto" would give now.
    other = TensorTrainEmbedding(97, 24, "tt:cores=3,rank=4",
                                 layout={"vocab_shape": [2, 7, 7], "dim_shape": [2, 2, 6]})
    assert other.vocab_shape == [2, 7, 7] and other.dim_shape == [2, 2, 6]
    loaded = embcompress.load(embcompress.save(other, tmp_path / "t.emb"))
    assert loaded.vocab_shape == [2, 7, 7] and loaded.dim_shape == [2, 2, 6]
    frozen = embcompress.load(embcompress.save(other.export(), tmp_path / "f.emb"))
    assert frozen.vocab_shape == [2, 7, 7] and frozen.metadata() == other.layout()


def test_explicit_shapes_and_errors():
    table = embcompress.build("tt:cores=3,rank=4,vocab_shape=2x7x7,dim_shape=6x2x2", 97, 24)
    assert table.vocab_shape == [2, 7, 7] and table.dim_shape == [6, 2, 2]
    partial = embcompress.build("tt:cores=3,rank=4,vocab_shape=2x7x7", 97, 24)
    assert partial.vocab_shape == [2, 7, 7] and sorted(partial.dim_shape) == [2, 3, 4]
    with pytest.raises(SpecError, match=r"covers 64 rows, fewer than num_embeddings=97.*vocab_shape=\d+x\d+x\d+"):
        embcompress.build("tt:cores=3,vocab_shape=4x4x4", 97, 24)
    with pytest.raises(SpecError, match=r"multiplies to 32, not embedding_dim=24.*dim_shape=2x3x4"):
        embcompress.build("tt:cores=3,dim_shape=2x4x4", 97, 24)
    with pytest.raises(SpecError, match=r"needs exactly 3 positive factors.*cores=3"):
        embcompress.parse_spec("tt:cores=3,vocab_shape=10x10")
    with pytest.raises(SpecError, match=r"'auto' or 2 positive integers joined by 'x', like 8x8"):
        embcompress.parse_spec("tt:cores=2,dim_shape=4*6")
    with pytest.raises(SpecError, match="cores must be in 2..8"):
        TTConfig(cores=1)
    with pytest.raises(SpecError, match="stored layout does not fit"):
        TensorTrainEmbedding(97, 24, "tt:cores=2", layout={"vocab_shape": [5, 5], "dim_shape": [4, 6]})


@pytest.mark.parametrize("cores,rank,std", [(2, 16, 1.0), (3, 16, 1.0), (4, 8, 0.1)])
def test_init_std_of_reconstructed_rows(cores, rank, std):
    stds = []
    for seed in range(3):
        torch.manual_seed(seed)
        table = embcompress.build(f"tt:cores={cores},rank={rank},init_std={std}", 4096, 64)
        stds.append(float(table.materialize().std()))
    # Products of Gaussians are heavy-tailed and rows share cores: average a few draws.
    assert sum(stds) / len(stds) == pytest.approx(std, rel=0.2)


def test_tt_svd_is_exact_at_full_rank():
    torch.manual_seed(0)
    weight = torch.randn(30, 12)  # padded to V' = 30 = 2x3x5 rows, d = 2x2x3
    vocab, dims = [2, 3, 5], [2, 2, 3]
    full_rank = max(min(math.prod(vocab[:k]) * math.prod(dims[:k]), math.prod(vocab[k:]) * math.prod(dims[k:]))
                    for k in range(1, 3))
    ranks = [1, full_rank, full_rank, 1]
    cores = tt_svd(weight, vocab, dims, ranks)
    torch.testing.assert_close(naive_table(cores, vocab, dims, 30), weight, atol=1e-4, rtol=1e-4)
    table = embcompress.from_pretrained(weight, f"tt:cores=3,rank={full_rank},vocab_shape=2x3x5,dim_shape=2x2x3",
                                        steps=0)
    torch.testing.assert_close(table.materialize(), weight, atol=1e-4, rtol=1e-4)


def test_refinement_improves_on_tt_svd_over_real_rows():
    torch.manual_seed(0)
    weight = torch.randn(97, 24)  # padded to 100 rows; the zero rows pull TT-SVD towards zero
    errors = []
    for steps in (0, 100):
        table = embcompress.from_pretrained(weight, "tt:cores=2,rank=12", steps=steps)
        errors.append(float((table.materialize() - weight).pow(2).mean() / weight.pow(2).mean()))
    assert math.prod(table.vocab_shape) == 100
    assert errors[1] < errors[0] < 1.0


@pytest.mark.parametrize("spec,rows,dim", [("tt:cores=2,rank=5", 97, 24), ("tt:cores=3,rank=4", 500, 24),
                                           ("tt:cores=4,rank=3", 1000, 16), ("tt:cores=5,rank=2", 700, 32)])
def test_fast_lookup_matches_naive_reconstruction(spec, rows, dim):
    table = embcompress.build(spec, rows, dim).eval()
    dense = naive_table([c.detach() for c in table.cores], table.vocab_shape, table.dim_shape, rows)
    ids = torch.randint(0, rows, (3, 50))
    torch.testing.assert_close(table(ids), dense[ids], rtol=1e-5, atol=1e-5)
    frozen = table.export()
    torch.testing.assert_close(frozen(ids), dense[ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen.materialize(), dense, rtol=1e-5, atol=1e-5)


def test_frozen_without_cache_matches_cached(monkeypatch):
    table = embcompress.build("tt:cores=3,rank=4", 500, 24).eval()
    cached = table.export()
    assert cached._left_table is not None and cached._right_table is not None
    monkeypatch.setattr(FrozenTensorTrain, "cache_floats", 0)
    chained = table.export()
    assert chained._left_table is None and chained._right_table is None
    ids = torch.randint(0, 500, (200,))
    torch.testing.assert_close(chained(ids), cached(ids), rtol=1e-5, atol=1e-5)


def test_frozen_stores_exactly_the_cores_and_checks_shapes():
    table = embcompress.build("tt:cores=3,rank=4", 97, 24)
    frozen = table.export()
    assert sorted(frozen.stored_tensors()) == ["core0", "core1", "core2"]
    assert frozen.num_bytes() == 4 * sum(c.numel() for c in table.cores)
    cores = {f"core{k}": c.detach() for k, c in enumerate(table.cores)}
    meta = frozen.metadata()
    with pytest.raises(ValueError, match=r"core1 must have shape .* leading dims \(4, 4, 2\), got \(4, 3, 2, 4\)"):
        FrozenTensorTrain(97, 24, **meta, **{**cores, "core1": cores["core1"][:, :3]})
    with pytest.raises(ValueError, match=r"needs tensors \['core0', 'core1', 'core2'\]"):
        FrozenTensorTrain(97, 24, **meta, core0=cores["core0"], core1=cores["core1"])
    with pytest.raises(ValueError, match="fewer than num_embeddings=101"):
        FrozenTensorTrain(101, 24, **meta, **cores)


def test_paper_imdb_byte_counts():
    """V = 25,000, d = 256, rank 16; the paper reports about 94x / 233x / 442x for 3 / 4 / 6 cores."""
    dense = 25_000 * 256 * 4
    paper_shapes = {3: ("25x30x40", "4x8x8"), 4: ("10x10x15x20", "4x4x4x4"), 6: ("5x5x5x5x6x8", "2x2x2x2x4x4")}
    paper_ratios = {3: 93.9, 4: 232.6, 6: 441.5}
    ours = {3: 188.7, 4: 281.7, 6: 578.0}
    for cores in (3, 4, 6):
        vocab, dims = paper_shapes[cores]
        spec = f"tt:cores={cores},rank=16,vocab_shape={vocab},dim_shape={dims}"
        size = TensorTrainEmbedding.expected_bytes(embcompress.parse_spec(spec), 25_000, 256)
        assert dense / size == pytest.approx(paper_ratios[cores], abs=0.05)  # the paper's shapes, reproduced
        table = embcompress.build(f"tt:cores={cores},rank=16", 25_000, 256)
        assert table.num_bytes() == TensorTrainEmbedding.expected_bytes(table.config, 25_000, 256)
        # Auto shapes put the smallest cores in the middle: more compression at the same rank.
        assert table.compression_ratio() == pytest.approx(ours[cores], abs=0.05)


def test_budget_varies_the_rank():
    from embcompress.budget import config_for_budget

    config = config_for_budget("tt:cores=3", 25_000, 256, ratio=94)
    assert config.cores == 3
    size = TensorTrainEmbedding.expected_bytes(config, 25_000, 256)
    assert size <= 25_000 * 256 * 4 / 94 < TensorTrainEmbedding.expected_bytes(
        config.replace(rank=config.rank + 1), 25_000, 256)


@pytest.mark.parametrize("dim_shape,transposed", [([4, 4, 8], True), ([4, 8, 4], True), ([2, 4, 16], False)])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_cached_lookup_equals_the_core_chain_in_both_orientations(dim_shape, transposed, chunk):
    from embcompress.frozen.tt import tt_rows, tt_rows_cached

    g = torch.Generator().manual_seed(3)
    vocab, ranks = [5, 6, 7], [1, 3, 4, 1]
    cores = {f"core{k}": torch.randn(ranks[k], vocab[k], dim_shape[k], ranks[k + 1], generator=g) for k in range(3)}
    frozen = FrozenTensorTrain(200, math.prod(dim_shape), vocab_shape=vocab, dim_shape=dim_shape, **cores)
    assert frozen._transposed is transposed
    assert frozen.num_bytes() == 4 * sum(c.numel() for c in cores.values())  # the cache is not the artifact
    assert frozen.cache_bytes() > 0
    ids = torch.randint(0, 200, (100,), generator=g)
    reference = tt_rows(list(cores.values()), vocab, frozen.split, ids)  # the chain, no cache
    fast = tt_rows_cached(frozen._left_table, frozen._right_table, ids, frozen._transposed, chunk=chunk)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen(ids), reference, rtol=1e-5, atol=1e-5)


def test_whole_half_tables_equal_the_chain_with_the_same_gradients():
    from embcompress.frozen.tt import row_digits, tt_half, tt_half_table

    g = torch.Generator().manual_seed(4)
    vocab, dims, ranks = [3, 4, 5, 2], [2, 3, 2, 2], [1, 3, 4, 2, 1]
    cores = [torch.randn(ranks[k], vocab[k], dims[k], ranks[k + 1], generator=g, dtype=torch.float64,
                         requires_grad=True) for k in range(4)]
    for m in (1, 2, 3):
        for side, part in (("left", slice(0, m)), ("right", slice(m, None))):
            shape = vocab[part]
            chain = tt_half(cores[part], row_digits(torch.arange(math.prod(shape)), shape), side)
            upstream = torch.randn(chain.shape, generator=g, dtype=torch.float64)
            want = torch.autograd.grad(chain, cores[part], upstream)
            whole = tt_half_table(cores[part], side)
            torch.testing.assert_close(whole, chain)
            got = torch.autograd.grad(whole, cores[part], upstream)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dim_shape", [[4, 4, 8], [2, 4, 16]])
@pytest.mark.parametrize("count", [5, 300])  # few ids: the chain over distinct prefixes; many: whole halves
def test_training_rows_and_gradients_equal_the_naive_chain(dim_shape, count):
    from embcompress.frozen.tt import tt_rows

    g = torch.Generator().manual_seed(5)
    vocab, ranks = [5, 6, 7], [1, 3, 4, 1]
    cores = [torch.randn(ranks[k], vocab[k], dim_shape[k], ranks[k + 1], generator=g, dtype=torch.float64,
                         requires_grad=True) for k in range(3)]
    ids = torch.randint(0, 210, (count,), generator=g)
    dense = naive_table(cores, vocab, dim_shape, 210)
    rows = tt_rows(cores, vocab, 2, ids)
    torch.testing.assert_close(rows, dense[ids])
    upstream = torch.randn(rows.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(rows, cores, upstream), torch.autograd.grad(dense[ids], cores, upstream)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dim_shape", [[8, 2, 2], [2, 2, 8], [4, 2, 8]])  # D_l > D_r, D_l < D_r, equal
@pytest.mark.parametrize("count", [5, 400])  # few ids: tt_rows' chain; many: both halves whole, no dedupe
def test_module_rows_and_gradients_equal_the_naive_table(dim_shape, count):
    torch.manual_seed(6)
    vocab = [5, 6, 7]
    table = TensorTrainEmbedding(200, math.prod(dim_shape), "tt:cores=3,rank=3",
                                 layout={"vocab_shape": vocab, "dim_shape": dim_shape}).double()
    cores = list(table.cores)
    ids = torch.randint(0, 200, (count,))  # repeats at 400
    dense = naive_table(cores, vocab, dim_shape, 200)
    rows = table(ids)
    torch.testing.assert_close(rows, dense[ids])
    upstream = torch.randn(rows.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(rows, cores, upstream), torch.autograd.grad(dense[ids], cores, upstream)):
        torch.testing.assert_close(a, b)
