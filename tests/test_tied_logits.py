"""Tied output layers: logits from the compressed form, and output-aware (hidden-state weighted) fits."""

import pytest
import torch

import embcompress
from embcompress.tied_logits import (CompressedLogits, fit_output_aware, hidden_second_moment, output_metric)

from helpers import synthetic_table


@pytest.mark.parametrize("spec, path", [("pq:groups=4,codewords=8", "codebook-scores"),
                                        ("dpq:groups=6,codewords=8", "codebook-scores"),
                                        ("codes:books=3,codewords=8", "codebook-scores"),
                                        ("lowrank:rank=5", "factors"), ("distilled:rank=4", "factors"),
                                        ("scalar:bits=4,block=8", "decode")])
def test_logits_from_the_compressed_form_equal_the_dense_product(spec, path):
    weight = synthetic_table(120, 24)
    frozen = embcompress.from_pretrained(weight, spec, padding_idx=3, **({"steps": 5} if "codes" not in spec else {}))
    frozen = frozen.eval().export()
    bias = torch.randn(120)
    head = CompressedLogits(frozen, bias)
    assert head.path == path
    hidden = torch.randn(2, 7, 24)
    expected = hidden @ frozen.materialize().t() + bias
    torch.testing.assert_close(head(hidden), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["pq:groups=4,codewords=8", "lowrank:rank=3", "codes:books=2,codewords=8"])
def test_output_aware_fit_lowers_the_logit_error_and_keeps_the_format(spec):
    g = torch.Generator().manual_seed(0)
    weight = synthetic_table(300, 16, rank=8, noise=0.3)
    # Hidden states that load a few directions heavily, like the residual stream before a head.
    hidden = torch.randn(2000, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    moment = hidden_second_moment([hidden])
    torch.manual_seed(0)
    plain = embcompress.from_pretrained(weight, spec).export()
    torch.manual_seed(0)
    aware = fit_output_aware(weight, spec, output_metric(moment, output_weight=10.0))
    assert type(aware) is type(plain) and aware.num_bytes() == plain.num_bytes()
    logit_error = lambda frozen: float((hidden @ (frozen.materialize() - weight).t()).pow(2).mean())  # noqa: E731
    # A product quantizer cannot move codewords between groups, so its gain is the smallest.
    assert logit_error(aware) < (0.99 if spec.startswith("pq") else 0.9) * logit_error(plain)


def test_a_tied_llama_head_runs_from_the_frozen_table():
    from test_planner import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 9))
    weight = model.get_input_embeddings().weight.detach()
    frozen = embcompress.from_pretrained(weight, "pq:groups=8,codewords=16").export()
    reference = model.model.embed_tokens.weight.data.copy_(frozen.materialize())
    with torch.no_grad():
        expected = model(ids).logits
    model.model.embed_tokens = frozen
    model.lm_head = CompressedLogits(frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert reference.shape == (300, 32)
