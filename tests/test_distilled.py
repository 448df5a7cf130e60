"""Distilled embedding: the stage-1 autoencoder, the factors export, and tied output logits."""

import pytest
import torch

import embcompress
from embcompress.frozen import FrozenFactors
from helpers import relative_mse, synthetic_table


def centered_svd_error(weight, rank):
    """Eckart-Young bound for f(U) W + b: the best affine rank-r fit is the centered truncated SVD."""
    centered = weight - weight.mean(0)
    s = torch.linalg.svdvals(centered)
    return float(s[rank:].pow(2).sum() / weight.numel() / centered.pow(2).mean())


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "identity"])
def test_never_worse_than_lowrank_at_the_same_rank(activation):
    # An offset table, so the centered start is strictly better than the uncentered SVD.
    weight = synthetic_table(200, 16, rank=6) + torch.linspace(-1, 2, 16)
    rank = 3
    lowrank = relative_mse(embcompress.from_pretrained(weight, f"lowrank:rank={rank}").materialize(), weight)
    distilled = embcompress.from_pretrained(weight, f"distilled:rank={rank},activation={activation}", steps=30)
    error = relative_mse(distilled.materialize(), weight)
    assert error <= lowrank + 1e-4, (error, lowrank)
    assert error >= centered_svd_error(weight, rank) - 1e-4  # f(U) W + b has rank <= r plus a bias


def test_codes_are_encoder_pre_activations():
    weight = synthetic_table(128, 12)
    table = embcompress.from_pretrained(weight, "distilled:rank=4,activation=tanh", steps=30)
    # Codes are affine in the rows (a linear encoder), so they are stored before f.
    rows = torch.cat([weight, torch.ones(128, 1)], 1)
    solution = torch.linalg.lstsq(rows, table.codes.detach()).solution
    torch.testing.assert_close(rows @ solution, table.codes.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(table.materialize(), torch.tanh(table.codes) @ table.basis + table.bias)


def test_relu_start_is_exact_and_bias_off_matches_lowrank():
    weight = synthetic_table(100, 10) + 0.5
    start = embcompress.from_pretrained(weight, "distilled:rank=4", steps=0)
    assert relative_mse(start.materialize(), weight) == pytest.approx(centered_svd_error(weight, 4), abs=1e-5)
    no_bias = embcompress.from_pretrained(weight, "distilled:rank=4,activation=identity,bias=false", steps=0)
    lowrank = embcompress.from_pretrained(weight, "lowrank:rank=4")
    torch.testing.assert_close(no_bias.materialize(), lowrank.materialize(), atol=1e-4, rtol=1e-4)


def test_export_and_bytes():
    table = embcompress.from_pretrained(synthetic_table(), "distilled:rank=5,activation=gelu", steps=10)
    frozen = table.export()
    assert isinstance(frozen, FrozenFactors) and frozen.activation == "gelu"
    assert frozen.num_bytes() == 4 * (256 * 5 + 5 * 24 + 24)
    no_bias = embcompress.build("distilled:rank=5,bias=false", 256, 24)
    assert no_bias.num_bytes() == 4 * (256 * 5 + 5 * 24) and no_bias.bias is None
    torch.testing.assert_close(frozen.materialize(), table.materialize())


@pytest.mark.parametrize("spec", ["lowrank:rank=4", "distilled:rank=4", "distilled:rank=4,activation=tanh,bias=false"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_output_logits_match_the_dense_table(spec, padding_idx):
    table = embcompress.from_pretrained(synthetic_table(60, 12), spec, padding_idx=padding_idx, steps=10)
    hidden = torch.randn(2, 3, 12, requires_grad=True)
    logits = table.output_logits(hidden)
    assert logits.shape == (2, 3, 60)
    torch.testing.assert_close(logits, hidden @ table.materialize().T, atol=1e-5, rtol=1e-5)
    logits.sum().backward()  # usable as a tied LM head
    assert hidden.grad is not None and table.codes.grad is not None and table.basis.grad is not None
    with pytest.raises(ValueError, match="embedding dim 12"):
        table.output_logits(torch.randn(3, 11))
