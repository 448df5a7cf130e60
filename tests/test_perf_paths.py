"""Fast lookup paths of the frozen formats against plain numpy decoders of the stored tensors,
and FrozenEmbedding.bag against nn.EmbeddingBag on the materialized table. No timing here:
speed ratios live in benchmarks/perf.py."""

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import embcompress
from embcompress.frozen import (FrozenCodebook, FrozenFactors, FrozenHashed, FrozenQR,
                                FrozenScalar, FrozenTensorTrain)
from embcompress.hashing import PRIME, HashFunction
from method_cases import CASES

V, D = 97, 24
SPECS = [spec for name in embcompress.list_methods() for spec, _ in CASES.get(name, [])]


# -- numpy reference decoders (read only the stored tensors and metadata) -----------------------

def np_codes(packed: np.ndarray, rows: int, books: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(packed, bitorder="little")[: rows * books * bits].reshape(rows, books, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(-1)


def np_decode(module) -> np.ndarray:
    """The dense (V, d) table, decoded in numpy from module.stored_tensors() and module.metadata()."""
    t = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
         for k, v in module.stored_tensors().items()}
    meta, n = module.metadata(), module.num_embeddings
    ids = np.arange(n)
    if module.format == "codebook":
        codes = np_codes(t["packed"], n, meta["books"], meta["bits"])
        cb = t["codebooks"]
        parts = np.stack([cb[0 if cb.shape[0] == 1 else j][codes[:, j]] for j in range(meta["books"])], 1)
        out = parts.sum(1) if meta["combine"] == "sum" else parts.reshape(n, -1)
    elif module.format == "hashed":
        h = meta["hash"]
        a, b = int(h["a"]), int(h["b"])
        bucket = ids % h["buckets"] if h["kind"] == "mod" else ((ids * a + b) % PRIME) % h["buckets"]
        out = t["table"][bucket]
        if "scale" in t:
            out = out * t["scale"][:, None]
        if "bias" in t:
            out = out + t["bias"][:, None]
    elif module.format == "factors":
        acts = {"identity": lambda x: x, "relu": lambda x: np.maximum(x, 0), "tanh": np.tanh,
                "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))}
        out = acts[meta["activation"]](t["codes"]) @ t["basis"]
        if "bias" in t:
            out = out + t["bias"]
    elif module.format == "scalar" and (meta.get("block") or meta.get("offset") or meta["bits"] in (3, 2)):
        bits, dim = meta["bits"], module.embedding_dim
        codes = np_codes(t["values"], n, dim, bits)
        block = meta.get("block") or dim
        column_block = np.arange(dim) // block
        if meta.get("offset"):
            out = codes * t["scale"][:, column_block] + t["minimum"][:, column_block]
        else:
            out = (codes - 2 ** (bits - 1)) * t["scale"][:, column_block]
    elif module.format == "scalar":
        bits, values = meta["bits"], t["values"]
        if bits == 4:
            q = np.stack([values & 0xF, values >> 4], -1).reshape(n, -1)[:, : module.embedding_dim].astype(np.int64)
            values = np.where(q > 7, q - 16, q)
        out = values.astype(np.float32) * (t["scale"][:, None] if bits != 16 else 1.0)
    elif module.format == "qr":
        m = t["remainder"].shape[0]
        q, r = t["quotient"][ids // m], t["remainder"][ids % m]
        out = {"mult": q * r, "add": q + r}.get(meta["combine"])
        out = np.concatenate([q, r], 1) if out is None else out
    elif module.format == "tt":
        vocab, dims = meta["vocab_shape"], meta["dim_shape"]
        full = t["core0"]  # (1, v1, d1, r1) -> chain to (v1..vn, d1..dn) row-major per index
        acc = full.reshape(vocab[0], dims[0], -1)
        for k in range(1, len(vocab)):
            core = t[f"core{k}"]
            acc = np.einsum("vdr,rwes->vwdes", acc, core).reshape(acc.shape[0] * vocab[k], acc.shape[1] * dims[k], -1)
        out = acc[:n, :, 0]
    else:
        raise AssertionError(f"no numpy decoder for format {module.format}")
    if module.padding_idx is not None:
        out = out.copy()
        out[module.padding_idx] = 0
    return out.astype(np.float32)


def direct_formats():
    """Formats built directly, covering each fast-path branch (bit widths, shared books, fp16, bias)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for bits_k, books, combine, shared in [(2, 8, "concat", False), (4, 6, "concat", False), (4, 6, "sum", False),
                                           (4, 8, "sum", True), (16, 4, "concat", True), (256, 3, "sum", False),
                                           (200, 4, "concat", False), (5, 8, "sum", False), (32, 3, "concat", False),
                                           (1000, 4, "sum", False), (3, 5, "concat", False), (40000, 2, "sum", False),
                                           (32, 8, "sum", False), (64, 4, "concat", False), (128, 8, "sum", False),
                                           (20, 16, "sum", True)]:
        width = D // books if combine == "concat" and D % books == 0 else (D if combine == "sum" else 1)
        dim_books = books if combine == "concat" else 1
        codes = torch.randint(0, bits_k, (V, books), generator=g)
        cb = torch.randn(1 if shared else books, bits_k, width, generator=g)
        m = FrozenCodebook.from_codes(codes, cb, combine)
        assert m.embedding_dim == width * dim_books
        out[f"codebook-K{bits_k}-M{books}-{combine}{'-shared' if shared else ''}"] = m
    out["codebook-fp16"] = FrozenCodebook.from_codes(torch.randint(0, 16, (V, 4), generator=g),
                                                     torch.randn(4, 16, 6, generator=g).half(), "concat")
    small = FrozenCodebook.from_codes(torch.randint(0, 16, (V, 8), generator=g), torch.randn(8, 16, D, generator=g),
                                      "sum")
    small.byte_table_floats = 0  # force the fallback (byte windows) path on the same data
    small._build_fast_path()
    out["codebook-window-fallback"] = small
    universal = HashFunction.create("universal", 13, g).to_dict()
    out["hashed-scale-bias"] = FrozenHashed(V, D, 5, hash=universal, table=torch.randn(13, D, generator=g),
                                               scale=torch.randn(V, generator=g), bias=torch.randn(V, generator=g))
    out["hashed-mod"] = FrozenHashed(V, D, hash={"kind": "mod", "buckets": 11},
                                        table=torch.randn(11, D, generator=g))
    for act in ("identity", "relu", "tanh", "gelu"):
        out[f"factors-{act}"] = FrozenFactors(V, D, activation=act, codes=torch.randn(V, 5, generator=g),
                                                    basis=torch.randn(5, D, generator=g),
                                                    bias=torch.randn(D, generator=g) if act != "identity" else None)
    weight = torch.randn(V, D, generator=g)
    for bits in (16, 8, 4):
        from embcompress.frozen.scalar import quantize_rows
        values, scale = quantize_rows(weight, bits)
        out[f"scalar-{bits}"] = FrozenScalar(V, D, bits=bits, values=values, scale=scale)
    for bits, block, offset in [(8, 32, False), (4, 7, True), (3, 0, False), (2, 5, True), (3, 16, True)]:
        out[f"scalar-{bits}-block{block}{'-offset' if offset else ''}"] = FrozenScalar.from_weight(
            weight, bits, block, offset)
    for combine in ("mult", "add", "concat"):
        w = D // 2 if combine == "concat" else D
        out[f"qr-{combine}"] = FrozenQR(V, D, combine=combine, quotient=torch.randn(-(-V // 10), w, generator=g),
                                           remainder=torch.randn(10, w, generator=g))
    out["tt"] = FrozenTensorTrain(V, D, vocab_shape=[10, 10], dim_shape=[4, 6],
                                 core0=torch.randn(1, 10, 4, 3, generator=g),
                                 core1=torch.randn(3, 10, 6, 1, generator=g))
    return out


DIRECT = direct_formats()


def exported(spec, padding_idx=None):
    torch.manual_seed(0)
    return embcompress.build(spec, V, D, padding_idx=padding_idx).export()


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_fast_path_matches_numpy_decoder(name):
    module = DIRECT[name]
    reference = np_decode(module)
    ids = torch.randint(0, module.num_embeddings, (300,))
    np.testing.assert_allclose(module(ids).numpy(), reference[ids.numpy()], rtol=1e-5, atol=1e-5)
    if hasattr(module, "reference_lookup"):
        torch.testing.assert_close(module.lookup(ids), module.reference_lookup(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_exported_methods_match_numpy_decoder(spec):
    module = exported(spec, padding_idx=2)
    np.testing.assert_allclose(module.materialize().numpy(), np_decode(module), rtol=1e-5, atol=1e-5)


def test_byte_table_is_rebuilt_when_a_state_dict_is_loaded():
    a = DIRECT["codebook-K4-M8-sum-shared"]
    b = FrozenCodebook.from_codes(torch.zeros(V, 8, dtype=torch.long), torch.zeros(1, 4, D), "sum")
    b.load_state_dict(a.state_dict())
    ids = torch.arange(V)
    torch.testing.assert_close(b(ids), a(ids))


def test_fast_paths_use_byte_tables_where_they_apply():
    assert DIRECT["codebook-K4-M8-sum-shared"]._fast_mode == "bytes"  # 2-bit codes, 4 to a byte
    assert DIRECT["codebook-K16-M4-concat-shared"]._fast_mode == "bytes"
    assert DIRECT["codebook-K256-M3-sum"]._fast_mode == "bytes"
    assert DIRECT["codebook-K5-M8-sum"]._fast_mode == "window"  # 3-bit codes, 24 bits a row
    assert DIRECT["codebook-K40000-M2-sum"]._fast_mode == "wide"
    assert DIRECT["codebook-K32-M3-concat"]._fast_mode == "generic"  # 15 bits a row: not byte-aligned
    assert DIRECT["codebook-window-fallback"]._fast_mode == "window"
    # Grouped windows: 5 bytes hold 8 five-bit codes, 3 bytes 4 six-bit codes; 7-bit codes need 7-byte
    # groups (beyond exact float64 reads) and keep the byte windows.
    assert DIRECT["codebook-K32-M8-sum"]._group == 5 and DIRECT["codebook-K64-M4-concat"]._group == 3
    assert DIRECT["codebook-K20-M16-sum-shared"]._group == 5 and DIRECT["codebook-K5-M8-sum"]._group == 3
    assert DIRECT["codebook-K128-M8-sum"]._fast_mode == "window" and DIRECT["codebook-K128-M8-sum"]._group == 0


@pytest.mark.parametrize("name", ["codebook-K32-M8-sum", "codebook-K64-M4-concat", "codebook-K20-M16-sum-shared",
                                  "codebook-window-fallback"])
def test_grouped_windows_read_the_same_codes_as_byte_windows(name):
    module = DIRECT[name]
    ids = torch.randint(0, module.num_embeddings, (200,))
    grouped = module._indices(ids)
    group, module._group = module._group, 0
    try:
        windows = module._indices(ids)
    finally:
        module._group = group
    assert torch.equal(grouped, windows)
    assert torch.equal(grouped - module._slot_offsets, module.codes(ids).int())
    converted = copy.deepcopy(module).float()  # a dtype cast of the module leaves the code reads alone
    assert torch.equal(converted._indices(ids), grouped)


# -- bag mode ------------------------------------------------------------------------------------

BAG_MODULES = {**{f"spec:{s}": (lambda s=s: exported(s)) for s in SPECS},
               **{f"spec-pad:{s}": (lambda s=s: exported(s, padding_idx=4)) for s in SPECS[::3]},
               **{f"direct:{k}": (lambda k=k: DIRECT[k]) for k in sorted(DIRECT)}}


@pytest.mark.parametrize("name", sorted(BAG_MODULES))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_matches_embedding_bag(name, mode):
    module = BAG_MODULES[name]()
    bag = nn.EmbeddingBag.from_pretrained(module.materialize(), mode=mode, padding_idx=module.padding_idx)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, module.num_embeddings, (23,), generator=g)
    ids[::5] = module.padding_idx if module.padding_idx is not None else ids[::5]
    offsets = torch.tensor([0, 3, 3, 10, 22])  # includes an empty bag
    torch.testing.assert_close(module.bag(ids, offsets, mode=mode), bag(ids, offsets), rtol=1e-5, atol=1e-5)
    ids2d = ids[:20].reshape(4, 5)
    torch.testing.assert_close(module.bag(ids2d, mode=mode), bag(ids2d), rtol=1e-5, atol=1e-5)
    if mode == "sum":  # nn.EmbeddingBag takes per-sample weights in sum mode only
        weights = torch.rand(23, generator=g)
        torch.testing.assert_close(module.bag(ids, offsets, per_sample_weights=weights, mode="sum"),
                                   bag(ids, offsets, per_sample_weights=weights), rtol=1e-5, atol=1e-5)


def test_grouped_windows_stay_out_of_traced_graphs():
    import warnings

    module = DIRECT["codebook-K32-M8-sum"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, torch.arange(7), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "__rshift__" not in graph and "bitwise_right_shift" not in graph
    other = torch.randint(0, module.num_embeddings, (40,))
    torch.testing.assert_close(traced(other), module(other))


@pytest.mark.parametrize("name", ["hashed-mod", "hashed-scale-bias", "codebook-K16-M4-concat-shared",
                                  "codebook-K256-M3-sum", "codebook-K32-M8-sum", "codebook-K64-M4-concat"])
def test_fast_lookups_are_bit_exact_where_no_sum_is_reordered(name):
    module = DIRECT[name]
    ids = torch.randint(0, module.num_embeddings, (500,))
    fast, reference = module.lookup(ids), module.reference_lookup(ids)
    if name.endswith("-sum"):  # byte tables pre-add codewords: the same terms, summed in another order
        torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(fast, reference)


@pytest.mark.skipif(os.environ.get("EMBCOMPRESS_KERNELS") == "0", reason="C kernels turned off for this run")
def test_extension_is_built_by_the_dev_install():
    # CI installs with a C compiler; a silent build failure would leave every lookup on the slow path.
    from embcompress import kernels

    assert kernels.available(), "embcompress._kernels did not build: check the compiler output of `pip install -e .`"
