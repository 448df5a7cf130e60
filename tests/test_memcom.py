"""MEmCom: starts as the hashing trick, fits by ALS, beats hashing at equal bytes, exports to `hashed`."""

import pytest
import torch

import embcompress
from embcompress.budget import config_for_budget
from embcompress.frozen import FrozenHashed
from helpers import relative_mse, synthetic_table


def test_untrained_table_is_the_hashing_trick():
    torch.manual_seed(0)
    memcom = embcompress.build("memcom:buckets=10", 50, 8)
    hashed = embcompress.build("hash:buckets=10", 50, 8)
    hashed.table.data.copy_(memcom.table.data)
    ids = torch.arange(50)
    torch.testing.assert_close(memcom(ids), hashed(ids))


def test_zero_rounds_gives_bucket_means_and_more_rounds_only_help():
    weight = synthetic_table()
    hashed = embcompress.from_pretrained(weight, "hash:buckets=32")
    errors = [relative_mse(embcompress.from_pretrained(weight, "memcom:buckets=32", steps=s).materialize(), weight)
              for s in (0, 1, 3, 10, 30)]
    assert errors[0] == pytest.approx(relative_mse(hashed.materialize(), weight), rel=1e-5)
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.8 * errors[0]


@pytest.mark.parametrize("bias", [False, True])
def test_beats_hashing_trick_at_equal_bytes(bias):
    rows, dim, buckets = 256, 24, 48
    weight = synthetic_table(rows, dim)
    memcom = embcompress.from_pretrained(weight, f"memcom:buckets={buckets},bias={str(bias).lower()}")
    # The hashing trick gets the bytes of MEmCom's per-entity scalars as extra buckets.
    hash_config = config_for_budget("hash", rows, dim, bytes=memcom.num_bytes())
    hashed = embcompress.from_pretrained(weight, hash_config)
    assert hashed.num_bytes() <= memcom.num_bytes() and hash_config.buckets > buckets
    memcom_error = relative_mse(memcom.materialize(), weight)
    hash_error = relative_mse(hashed.materialize(), weight)
    assert memcom_error < 0.7 * hash_error, (memcom_error, hash_error)


def test_als_recovers_an_exact_memcom_table():
    g = torch.Generator().manual_seed(3)
    rows, dim, buckets = 300, 16, 20
    table = torch.randn(buckets, dim, generator=g)
    scale, bias = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    weight = scale.unsqueeze(1) * table[torch.arange(rows) % buckets] + bias.unsqueeze(1)
    fitted = embcompress.from_pretrained(weight, f"memcom:buckets={buckets},bias=true", steps=60)
    assert relative_mse(fitted.materialize(), weight) < 1e-6
    no_bias = weight - bias.unsqueeze(1)
    fitted = embcompress.from_pretrained(no_bias, f"memcom:buckets={buckets}", steps=60)
    assert relative_mse(fitted.materialize(), no_bias) < 1e-6


def test_padding_row_does_not_pull_its_bucket():
    weight = synthetic_table(64, 8)
    padded = weight.clone()
    padded[5] = 1e4  # garbage in the padding row
    clean = embcompress.from_pretrained(weight, "memcom:buckets=8", padding_idx=5).materialize()
    dirty = embcompress.from_pretrained(padded, "memcom:buckets=8", padding_idx=5).materialize()
    torch.testing.assert_close(clean, dirty)
    assert torch.all(dirty[5] == 0)


def test_export_is_hashed_with_scale_and_bias():
    table = embcompress.from_pretrained(synthetic_table(), "memcom:buckets=48,bias=true,hash=universal")
    frozen = table.export()
    assert isinstance(frozen, FrozenHashed) and frozen.hash == table.hash
    assert set(frozen.stored_tensors()) == {"table", "scale", "bias"}
    assert frozen.num_bytes() == 4 * (48 * 24 + 2 * 256)
    torch.testing.assert_close(frozen.materialize(), table.materialize())
    assert table.layout() == {"hash": table.hash.to_dict()}


def test_budget_and_its_ceiling():
    rows, dim = 2000, 32
    config = config_for_budget("memcom", rows, dim, ratio=20)
    size = embcompress.get_method("memcom").expected_bytes(config, rows, dim)
    assert 0.97 * rows * dim * 4 / 20 <= size <= rows * dim * 4 / 20
    with pytest.raises(embcompress.SpecError, match=r"always below d = 32; at most 31.50x"):
        config_for_budget("memcom", rows, dim, ratio=32)
    with pytest.raises(embcompress.SpecError, match=r"2\*V\) is always below d/2 = 16"):
        config_for_budget("memcom:bias=true", rows, dim, ratio=20)


@pytest.mark.parametrize("spec", ["memcom:buckets=7", "memcom:buckets=7,bias=true"])
def test_lookup_has_the_numbers_and_gradients_of_the_plain_formula(spec):
    import torch.nn.functional as F

    torch.manual_seed(0)
    table = embcompress.build(spec, 50, 6).double().train()
    with torch.no_grad():
        table.scale.uniform_(-2, 2)
        if table.bias is not None:
            table.bias.normal_()
    ids = torch.tensor([3, 10, 3, 49, 0, 17, 10, 3])  # repeats and bucket collisions
    upstream = torch.randn(8, 6, dtype=torch.float64)
    params = [p for p in (table.table, table.scale, table.bias) if p is not None]
    plain = F.embedding(table.hash(ids), table.table) * table.scale[ids].unsqueeze(1)
    if table.bias is not None:
        plain = plain + table.bias[ids].unsqueeze(1)
    got = table(ids)
    torch.testing.assert_close(got, plain)
    for a, b in zip(torch.autograd.grad(got, params, upstream), torch.autograd.grad(plain, params, upstream)):
        torch.testing.assert_close(a, b)
