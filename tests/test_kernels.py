"""The fused C lookups (embcompress._kernels) against the torch path on the same modules: equal
outputs for every layout the formats produce, bounds checks instead of out-of-buffer reads, and
the torch path wherever the C path must not run. No timing here: speed lives in benchmarks/perf.py."""

import math

import pytest
import torch

from embcompress import kernels
from embcompress.frozen import FrozenCodebook, FrozenFactors, FrozenHashed, FrozenTensorTrain
from embcompress.hashing import HashFunction
from test_perf_paths import DIRECT

# Without the extension (or with EMBCOMPRESS_KERNELS=0) the torch path runs everywhere and the
# rest of the suite tests it; test_perf_paths.py checks that the dev install built the extension.
pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="C kernels not built or turned off")

KERNEL_FORMATS = sorted(name for name in DIRECT if name.startswith(("codebook", "hashed")))


def torch_path(module, ids):
    previous = kernels.set_enabled(False)
    try:
        return module.lookup(ids)
    finally:
        kernels.set_enabled(previous)


@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.parametrize("count", [0, 1, 37, 5000])  # 5000 rows split across threads
def test_kernel_matches_torch_path(name, count):
    module = DIRECT[name]
    ids = torch.randint(0, module.num_embeddings, (count,), generator=torch.Generator().manual_seed(count))
    assert kernels.usable(ids, module.stored_tensors()[next(iter(module.stored_tensors()))])
    fast, reference = module.lookup(ids), torch_path(module, ids)
    assert fast.shape == reference.shape == (count, module.embedding_dim)
    if "sum" in name:  # the same additions in slot order; embedding_bag may vectorize them differently
        torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(fast, reference)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_split_gives_the_same_rows(threads):
    module = DIRECT["codebook-K5-M8-sum"]
    ids = torch.randint(0, module.num_embeddings, (9001,), generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = module.lookup(ids)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, torch_path(module, ids), rtol=1e-6, atol=1e-6)


def test_non_contiguous_ids_and_forward_shapes():
    module = DIRECT["codebook-K16-M4-concat-shared"]
    ids = torch.randint(0, module.num_embeddings, (40,))[::3]
    assert torch.equal(module.lookup(ids), torch_path(module, ids.contiguous()))
    grid = torch.randint(0, module.num_embeddings, (3, 5), dtype=torch.int32)
    assert module(grid).shape == (3, 5, module.embedding_dim)


@pytest.mark.parametrize("name", ["codebook-K4-M6-concat", "codebook-K5-M8-sum", "hashed-scale-bias", "hashed-mod"])
@pytest.mark.parametrize("bad", [-1, 97, 1 << 40])
def test_kernel_refuses_out_of_range_ids(name, bad):
    module = DIRECT[name]  # lookup() is called directly here, past forward()'s own id check
    ids = torch.tensor([0, 3, bad, 5])
    with pytest.raises(ValueError, match="outside"):
        module.lookup(ids)


def test_corrupt_codes_raise_instead_of_reading_past_the_codebook():
    # K = 3 needs 2 bits: the code value 3 names no codeword. The torch path would index past the
    # codebook too; the kernel must say so, not read neighbouring memory.
    codes = torch.tensor([[0, 1], [2, 0]])
    module = FrozenCodebook.from_codes(codes, torch.randn(2, 3, 4), "concat")
    module.packed.fill_(0xFF)
    with pytest.raises(ValueError, match="corrupt"):
        module.lookup(torch.tensor([0, 1]))


def test_universal_hash_matches_torch_for_ids_past_two_to_the_32():
    # a * id overflows int64 here: both paths must wrap the same way and take the same remainder.
    rows = (1 << 34) + 10
    hash = HashFunction("universal", 17, a=2_000_000_011, b=12345)
    module = FrozenHashed.__new__(FrozenHashed)  # a 2^34-row table holds no per-row tensors
    torch.nn.Module.__init__(module)
    module.num_embeddings, module.embedding_dim, module.padding_idx, module.hash = rows, 6, None, hash
    module.register_buffer("table", torch.randn(17, 6))
    module.scale = module.bias = None
    ids = torch.tensor([0, 1, (1 << 33) + 7, rows - 1, 12_345_678_901])
    assert torch.equal(module.lookup(ids), torch_path(module, ids))


def test_graph_capture_keeps_torch_ops():
    module = DIRECT["codebook-K4-M6-concat"]
    traced = torch.jit.trace(module, torch.arange(7), check_trace=False)
    # A trace through the C call would record only the empty output and return garbage for new ids.
    assert "index_select" in str(traced.inlined_graph)
    other = torch.randint(0, module.num_embeddings, (50,))
    assert torch.equal(traced(other), module(other))


def test_converted_dtypes_fall_back_to_torch():
    module = FrozenHashed(10, 4, hash={"kind": "mod", "buckets": 3}, table=torch.randn(3, 4)).double()
    ids = torch.tensor([1, 2, 9])
    assert module.lookup(ids).dtype == torch.float64


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_large_outputs_take_streaming_stores_with_the_same_rows(combine):
    # Outputs of 8 MB and more are written with streaming stores: 40,000 rows x 64 floats = 10 MB.
    g = torch.Generator().manual_seed(3)
    books = 8 if combine == "concat" else 4
    codebooks = torch.randn(books, 16, 64 // books if combine == "concat" else 64, generator=g)
    module = FrozenCodebook.from_codes(torch.randint(0, 16, (1000, books), generator=g), codebooks, combine)
    ids = torch.randint(0, 1000, (40_000,), generator=g)
    fast, reference = module.lookup(ids), torch_path(module, ids)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    if combine == "concat":
        assert torch.equal(fast, reference)


def test_large_hashed_outputs_take_streaming_stores_with_the_same_rows():
    g = torch.Generator().manual_seed(4)
    module = FrozenHashed(5000, 64, hash=HashFunction.create("universal", 300, g).to_dict(),
                             table=torch.randn(300, 64, generator=g), scale=torch.randn(5000, generator=g),
                             bias=torch.randn(5000, generator=g))
    ids = torch.randint(0, 5000, (40_000,), generator=g)
    assert torch.equal(module.lookup(ids), torch_path(module, ids))


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "gelu"])
@pytest.mark.parametrize("rank", [3, 16, 80])  # 80: past the kernel's 64-code chunk
def test_factors_kernel_matches_torch_path(activation, rank):
    g = torch.Generator().manual_seed(rank)
    codes = torch.randn(300, rank, generator=g)
    codes[7, 0] = float("nan")  # relu keeps NaN, as torch.relu does
    module = FrozenFactors(300, 72, activation=activation, codes=codes,
                                 basis=torch.randn(rank, 72, generator=g), bias=torch.randn(72, generator=g))
    ids = torch.randint(0, 300, (2500,), generator=g)
    ids[0] = 7
    torch.testing.assert_close(module.lookup(ids), torch_path(module, ids), rtol=1e-5, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dim_shape", [[4, 6], [8, 2], [16, 8, 1]])  # d_left > d_right: transposed halves
def test_tt_kernel_matches_torch_path(dim_shape):
    g = torch.Generator().manual_seed(len(dim_shape))
    vocab = [7, 5, 3][: len(dim_shape)]
    ranks = [1] + [4] * (len(dim_shape) - 1) + [1]
    cores = {f"core{k}": torch.randn(ranks[k], vocab[k], dim_shape[k], ranks[k + 1], generator=g)
             for k in range(len(dim_shape))}
    rows = 7 * 5 * 3 // (1 if len(dim_shape) == 3 else 3) - 2
    module = FrozenTensorTrain(rows, math.prod(dim_shape), vocab_shape=vocab[: len(dim_shape)], dim_shape=dim_shape,
                              **cores)
    assert module._left_table is not None and module._right_table is not None
    assert module._transposed == (dim_shape != [4, 6])
    ids = torch.randint(0, rows, (3000,), generator=g)
    torch.testing.assert_close(module.lookup(ids), torch_path(module, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        module.lookup(torch.tensor([rows]))


def assert_same_rows_but_near_ties(out, want, grads, want_grads):
    """The C and torch paths score rows in a different float order: a row whose best two codewords
    tie to rounding may pick the other one (rarely; none with this data on the machine these tests
    were written on, where gradients are compared too). Anything more is a bug."""
    differ = (out - want).abs().amax(1) > 1e-5
    assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {len(out)} rows differ"
    torch.testing.assert_close(out[~differ], want[~differ])
    if not differ.any():
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got.to_dense(), expected.to_dense(), rtol=1e-4, atol=1e-4)


def dpq_step(spec, count, use_kernels):
    """One training forward and backward of a fresh DPQ table, with or without the C kernels:
    rows, gradients of the query, keys (SX) and values, eval codes, and the table."""
    from embcompress.methods.dpq import DPQEmbedding

    torch.manual_seed(0)
    table = DPQEmbedding(3000, 32, spec).train()
    ids = torch.randperm(3000)[:count]
    upstream = torch.randn(count, 32)
    params = [p for p in (table.query, table.keys, table.values) if p is not None]
    previous = kernels.set_enabled(use_kernels)
    try:
        out = table(ids)
        aux = table.aux_loss()
        grads = torch.autograd.grad((out * upstream).sum() + (0 if aux is None else aux), params)
        table.eval()
        codes = table.codes(ids)
    finally:
        kernels.set_enabled(previous)
    return out, grads, codes, table


@pytest.mark.parametrize("spec", ["dpq:groups=4,codewords=8", "dpq:groups=8,codewords=16,tau=0.5",
                                  "dpq:groups=4,codewords=8,shared=true", "dpq:groups=4,codewords=8,batchnorm=false",
                                  "dpq:groups=2,codewords=200", "dpq:groups=2,codewords=300",  # 300: torch path
                                  "dpq:variant=vq,groups=4,codewords=8",
                                  "dpq:variant=vq,groups=8,codewords=16,shared=true",
                                  "dpq:variant=vq,groups=4,codewords=8,batchnorm=false"])
@pytest.mark.parametrize("count", [1, 37, 1500])  # 37, 1500: a last partial vector of 16 rows
def test_dpq_training_kernels_match_torch_path(spec, count):
    (out, grads, codes, table), (want, want_grads, want_codes, reference) = \
        dpq_step(spec, count, True), dpq_step(spec, count, False)
    assert_same_rows_but_near_ties(out, want, grads, want_grads)
    assert (codes != want_codes).any(1).float().mean() <= 0.01
    if table.config.batchnorm:
        torch.testing.assert_close(table.running_mean, reference.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(table.running_var, reference.running_var, rtol=1e-4, atol=1e-5)


def test_dpq_sx_kernel_codes_first_maximum_and_nan():
    from embcompress.methods.dpq import _sx_codes

    qt = torch.ones(2, 3, 20)  # (D, w, N)
    keys = torch.zeros(2, 4, 3)
    keys[:, 1] = keys[:, 3] = 1.0  # codewords 1 and 3 tie for every row
    qt[1, 0, 5] = float("nan")  # a NaN score: code K - 1, as the torch path gives
    codes, probs = _sx_codes(qt, keys, torch.zeros(2, 4), tau=1.0)
    expected = torch.ones(20, 2, dtype=torch.long)
    expected[5, 1] = 3
    assert torch.equal(codes, expected)
    # (D, blocks of 16 rows, K, 16): group 0, row 0
    torch.testing.assert_close(probs[0][0, 0, :, 0], torch.softmax(torch.tensor([0.0, 3.0, 0.0, 3.0]), 0))


def test_factors_kernel_tanh_is_accurate_across_its_range():
    values = torch.tensor([0.0, -0.0, 1e-7, -1e-4, 3e-3, 0.5, -1.0, 3.0, -9.0, 20.0, -100.0, float("inf")])
    module = FrozenFactors(len(values), 1, activation="tanh", codes=values.view(-1, 1), basis=torch.ones(1, 1))
    got = module.lookup(torch.arange(len(values))).view(-1)
    torch.testing.assert_close(got, torch.tanh(values), rtol=0, atol=2e-7)


@pytest.mark.parametrize("rows", [5, 4000])  # 4000: split across threads, each into its own table copy
@pytest.mark.parametrize("dim", [3, 40])  # 40: two 16-float vectors and a scalar tail
def test_bag_sum_backward_matches_index_add(rows, dim):
    g = torch.Generator().manual_seed(rows + dim)
    index = torch.randint(0, 24, (rows, 6), generator=g)  # positions may share table rows
    grad = torch.randn(rows, dim, generator=g)
    want = torch.zeros(24, dim)
    for position in range(6):
        want.index_add_(0, index[:, position], grad)
    # Sums of up to ~1,000 terms in another order: float rounding only.
    torch.testing.assert_close(kernels.bag_sum_backward(index, grad, 24), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="corrupt"):
        kernels.bag_sum_backward(index, grad, 20)


def test_codebook_sum_gradients_match_torch_path():
    from embcompress.frozen.codebook import decode_codes

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 8, (3000, 4), generator=g)
    upstream = torch.randn(3000, 24, generator=g)
    grads = []
    for use_kernels in (True, False):
        codebooks = torch.randn(4, 8, 24, generator=torch.Generator().manual_seed(6)).requires_grad_()
        previous = kernels.set_enabled(use_kernels)
        try:
            (decode_codes(codes, codebooks, "sum") * upstream).sum().backward()
        finally:
            kernels.set_enabled(previous)
        grads.append(codebooks.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["codebook-K4-M6-concat", "codebook-K5-M8-sum", "codebook-K16-M4-concat-shared",
                                  # byte slots, concat: added straight into the bags (widths 24, 6, fp16 12)
                                  "codebook-K2-M8-concat", "codebook-K200-M4-concat", "codebook-fp16",
                                  "hashed-scale-bias", "hashed-mod"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_c_bags_match_pooling_the_rows(name, mode, weighted):
    if weighted and mode != "sum":
        pytest.skip("nn.EmbeddingBag takes per-sample weights in sum mode only")
    module = DIRECT[name]
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 150, (40,), generator=g)  # empty bags, and bags past the 64-row chunk
    lengths[3] = 0
    ids = torch.randint(0, module.num_embeddings, (int(lengths.sum()),), generator=g)
    if module.padding_idx is not None:
        ids[::7] = module.padding_idx  # left out of sums and of the mean's count
    offsets = torch.cumsum(lengths, 0) - lengths
    weights = torch.rand(ids.shape[0], generator=g) if weighted else None
    got = module.bag(ids, offsets, per_sample_weights=weights, mode=mode)
    previous = kernels.set_enabled(False)
    try:
        want = module.bag(ids, offsets, per_sample_weights=weights, mode=mode)
    finally:
        kernels.set_enabled(previous)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("books,width", [(4, 4), (8, 4), (8, 8), (2, 32)])  # slot widths 8, 8, 16, 64 floats
def test_c_concat_bags_with_padding_equal_pooling_the_rows(books, width):
    """DPQ-shaped tables (4-bit codes, two to a byte): the direct bag path skips padding ids, counts
    only the others in the mean, and adds exactly the rows the row lookup returns."""
    g = torch.Generator().manual_seed(books * width)
    module = FrozenCodebook.from_codes(torch.randint(0, 16, (500, books), generator=g),
                                       torch.randn(books, 16, width, generator=g), "concat", padding_idx=3)
    assert module._fast_mode == "bytes" and module._slot_bits == 8
    lengths = torch.randint(0, 40, (30,), generator=g)
    ids = torch.randint(0, 500, (int(lengths.sum()),), generator=g)
    ids[::5] = 3
    offsets = torch.cumsum(lengths, 0) - lengths
    rows = module(ids)
    bags = torch.repeat_interleave(torch.arange(30), lengths)
    want_sum = torch.zeros(30, module.embedding_dim).index_add_(0, bags, rows)
    kept = torch.zeros(30).index_add_(0, bags, (ids != 3).float()).clamp_min(1).unsqueeze(1)
    torch.testing.assert_close(module.bag(ids, offsets, mode="sum"), want_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.bag(ids, offsets, mode="mean"), want_sum / kept, rtol=1e-5, atol=1e-5)


def test_c_bags_refuse_bad_offsets():
    module = DIRECT["hashed-mod"]
    ids = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="offsets"):
        module.bag(ids, torch.tensor([0, 3, 2]), mode="sum")
    with pytest.raises(ValueError, match="offsets"):
        module.bag(ids, torch.tensor([1, 2]), mode="sum")


def test_c_bags_name_what_offsets_must_be():
    module = DIRECT["hashed-mod"]
    with pytest.raises(ValueError, match=r"0 first, never decreasing, at most the number of ids \(4\); got \[0, 9\]"):
        module.bag(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 9]), mode="sum")
