"""Quotient-remainder: unique rows, exact bytes, least-squares fits, the `qr` format."""

import math

import pytest
import torch

import embcompress
from embcompress.budget import config_for_budget
from embcompress.frozen import FrozenQR
from helpers import relative_mse, synthetic_table


@pytest.mark.parametrize("combine", ["mult", "add", "concat"])
def test_every_id_gets_its_own_row(combine):
    table = embcompress.build(f"qr:buckets=7,combine={combine}", 50, 8)
    assert table.quotient.shape == (math.ceil(50 / 7), 8 if combine != "concat" else 4)
    assert table.remainder.shape == (7, 8 if combine != "concat" else 4)
    dense = table.materialize()
    assert torch.unique(dense, dim=0).shape[0] == 50  # unlike hashing, no two ids share a row
    ids = torch.tensor([0, 6, 7, 49])
    q, r = table.quotient[ids // 7], table.remainder[ids % 7]
    expected = {"mult": q * r, "add": q + r, "concat": torch.cat([q, r], 1)}[combine]
    torch.testing.assert_close(table(ids), expected)


def test_concat_needs_an_even_dim():
    with pytest.raises(embcompress.SpecError, match=r"embedding_dim=7 is odd; use combine='mult' or combine='add'"):
        embcompress.build("qr:buckets=4,combine=concat", 30, 7)
    with pytest.raises(embcompress.SpecError, match="odd"):
        embcompress.get_method("qr").expected_bytes(embcompress.parse_spec("qr:combine=concat"), 30, 7)


@pytest.mark.parametrize("spec,floats", [("qr:buckets=10", (10 + 10) * 6), ("qr:buckets=7", (15 + 7) * 6),
                                         ("qr:buckets=7,combine=concat", (15 + 7) * 3)])
def test_expected_bytes(spec, floats):
    assert embcompress.get_method("qr").expected_bytes(embcompress.parse_spec(spec), 100, 6) == 4 * floats
    assert embcompress.build(spec, 100, 6).num_bytes() == 4 * floats


@pytest.mark.parametrize("combine", ["mult", "add"])
def test_fit_recovers_an_exact_qr_table(combine):
    g = torch.Generator().manual_seed(0)
    rows, dim, m = 200, 8, 12
    quotient, remainder = torch.randn(math.ceil(rows / m), dim, generator=g), torch.randn(m, dim, generator=g)
    ids = torch.arange(rows)
    weight = quotient[ids // m] * remainder[ids % m] if combine == "mult" else quotient[ids // m] + remainder[ids % m]
    fitted = embcompress.from_pretrained(weight, f"qr:buckets={m},combine={combine}", steps=100)
    assert relative_mse(fitted.materialize(), weight) < 1e-6


def test_concat_fit_is_the_closed_form_and_rounds_only_help():
    weight = synthetic_table()
    concat = embcompress.from_pretrained(weight, "qr:buckets=16,combine=concat")
    ids = torch.arange(256)
    torch.testing.assert_close(concat.quotient[3], weight[ids // 16 == 3, :12].mean(0))
    torch.testing.assert_close(concat.remainder[5], weight[ids % 16 == 5, 12:].mean(0))
    for combine in ("mult", "add"):
        errors = [relative_mse(embcompress.from_pretrained(weight, f"qr:buckets=16,combine={combine}",
                                                           steps=s).materialize(), weight) for s in (1, 5, 30)]
        assert errors[0] >= errors[1] - 1e-6 >= errors[2] - 2e-6, (combine, errors)


def test_export_format_and_validation():
    table = embcompress.from_pretrained(synthetic_table(), "qr:buckets=16,combine=add", padding_idx=0)
    frozen = table.export()
    assert isinstance(frozen, FrozenQR) and frozen.format == "qr"
    assert frozen.metadata() == {"combine": "add"} and set(frozen.stored_tensors()) == {"quotient", "remainder"}
    torch.testing.assert_close(frozen.materialize(), table.materialize())
    assert torch.all(frozen.materialize()[0] == 0)
    with pytest.raises(ValueError, match=r"expected \(16, 24\) and \(16, 24\)"):
        FrozenQR(256, 24, combine="add", quotient=torch.zeros(15, 24), remainder=torch.zeros(16, 24))
    with pytest.raises(ValueError, match="combine must be one of mult, add, concat"):
        FrozenQR(256, 24, combine="sum", quotient=torch.zeros(16, 24), remainder=torch.zeros(16, 24))


def test_budget_uses_a_small_remainder_table():
    rows, dim = 10_000, 16
    config = config_for_budget("qr", rows, dim, ratio=20)
    assert config.buckets <= math.isqrt(rows) + 1
    size = embcompress.get_method("qr").expected_bytes(config, rows, dim)
    assert 0.97 * rows * dim * 4 / 20 <= size <= rows * dim * 4 / 20
