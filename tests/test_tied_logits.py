"""Tied output layers: logits from the compressed form, and output-aware (hidden-state weighted) fits."""

from pathlib import Path

import pytest
import torch

import embcompress
from embcompress.tied_logits import (CompressedLogits, fit_output_aware, fit_output_aware_module, hidden_second_moment,
                                     output_metric)

from helpers import synthetic_table


@pytest.mark.parametrize("spec, path", [("pq:groups=4,codewords=8", "codebook-scores"),
                                        ("pq:groups=4,codewords=8,rotation=pca", "codebook-scores"),
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


@pytest.mark.parametrize("spec", ["pq:groups=4,codewords=8", "pq:groups=4,codewords=8,rotation=pca", "lowrank:rank=3",
                                  "codes:books=2,codewords=8"])
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
    # A product quantizer cannot move codewords between groups, so its gain is the smallest (a rotated
    # one takes the whole metric into its basis).
    assert logit_error(aware) < (0.99 if spec == "pq:groups=4,codewords=8" else 0.9) * logit_error(plain)


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


def _anisotropic_llama():
    """A tiny tied Llama whose final norm loads a few directions heavily, as trained models do."""
    from test_planner import tiny_llama

    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.05, 4.0, 32) ** 2)
    return model


@pytest.mark.parametrize("spec, gain", [("pq:groups=8,codewords=16", None), ("dpq:groups=8,codewords=16", None),
                                        ("codes:books=3,codewords=16", 0.8), ("lowrank:rank=4", 0.8)])
def test_compress_with_calibration_fits_the_tied_table_for_its_logits(spec, gain):
    """The head's logit error on held-out hidden states drops for additive codes and low rank. Product
    quantizers are fitted under the metric's diagonal blocks (their codewords cannot mix groups),
    which here changes the error by about 1% either way, so for them only the wiring is checked."""
    from embcompress.surgery import TiedOutput

    calibration = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    dense = _anisotropic_llama()
    weight = dense.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        hidden = dense.model(held_out).last_hidden_state
    errors, reports = {}, {}
    for name, options in (("plain", {}), ("aware", {"calibration": calibration})):
        model = _anisotropic_llama()
        torch.manual_seed(0)
        reports[name] = embcompress.compress_(model, spec, **options)
        assert isinstance(model.lm_head, TiedOutput) and model.lm_head.table is model.model.embed_tokens
        with torch.no_grad():
            logits = model.lm_head(hidden)
        torch.testing.assert_close(logits, hidden @ model.model.embed_tokens.materialize().t(), rtol=1e-4, atol=1e-4)
        errors[name] = float((logits - hidden @ weight.t()).pow(2).mean())
    assert reports["aware"].tables[0].output_aware and not reports["plain"].tables[0].output_aware
    assert "output-aware fit" in str(reports["aware"])
    assert reports["aware"].bytes_after == reports["plain"].bytes_after
    if gain is not None:
        assert errors["aware"] < gain * errors["plain"], errors


def test_budget_with_calibration_measures_candidates_under_the_logit_metric():
    model = _anisotropic_llama()
    calibration = [torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    report = embcompress.compress_(model, budget="6x", methods=["scalar", "pq"], calibration=calibration)
    assert report.ratio >= 6 and report.tables[0].tied_heads == ["lm_head"]
    assert report.tables[0].output_aware == report.plan.specs["model.embed_tokens"].startswith("pq")
    with torch.no_grad():
        assert torch.isfinite(model(calibration[0]).logits).all()


def test_calibration_from_a_generator_is_read_once_for_both_the_metric_and_the_row_counts():
    batches = [torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    tables = []
    for calibration in (batches, (b for b in batches)):
        model = _anisotropic_llama()
        torch.manual_seed(0)
        embcompress.compress_(model, "pq:groups=8,codewords=16", calibration=calibration)
        tables.append(model.model.embed_tokens.materialize())
    torch.testing.assert_close(tables[1], tables[0], rtol=0, atol=0)


def test_calibration_errors_name_the_problem():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8))
    with pytest.warns(UserWarning, match="no table is tied to an output layer"):
        embcompress.compress_(model, "pq:groups=2,codewords=4", calibration=torch.randint(0, 50, (2, 5)))
    with pytest.raises(ValueError, match="calibration batches must be token-id tensors"):
        embcompress.compress_(_anisotropic_llama(), "pq:groups=2,codewords=4", calibration=[torch.randn(2, 5)])
    with pytest.raises(ValueError, match="dpq .variant=sx, shared=false."):
        fit_output_aware_module(torch.randn(40, 8), "dpq:variant=vq,groups=2,codewords=4", torch.eye(8))


def test_compress_model_cli_calibrates_tied_tables_on_texts(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install 'embcompress[hf]'")
    tokenizers = pytest.importorskip("tokenizers", reason="installed with transformers")
    from embcompress.cli import main

    model = _anisotropic_llama()
    folder = tmp_path / "llama"
    model.save_pretrained(folder, safe_serialization=True)
    words = {f"w{i}": i for i in range(299)} | {"[UNK]": 299}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    g = torch.Generator().manual_seed(0)
    texts.write_text("\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 299, (20,), generator=g))
                               for _ in range(12)))
    assert main(["-q", "compress-model", str(folder), "--ratio", "6", "--methods", "pq", "--calibration", str(texts),
                 "-o", str(tmp_path / "out")]) == 0
    assert "lm_head (output-aware fit)" in capsys.readouterr().out
    fresh = type(model).from_pretrained(folder).eval()
    report = embcompress.load_pretrained(fresh, tmp_path / "out")
    assert report.tables[0].tied_heads == ["lm_head"] and report.ratio >= 6
    model.save_pretrained(tmp_path / "bare", safe_serialization=True)  # no tokenizer to read the texts with
    assert main(["-q", "compress-model", str(tmp_path / "bare"), "--ratio", "6", "--calibration", str(texts),
                 "-o", str(tmp_path / "x")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    (tmp_path / "binary.txt").write_bytes(b"w1 w2\n\xff\xfe\x00 w3\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    for bad, message in ((tmp_path / "binary.txt", "is not UTF-8 text"), (tmp_path / "blank.txt", "no non-empty lines"),
                         (tmp_path, "is a directory"), (Path("/dev/zero"), "a device, FIFO or socket"),
                         (tmp_path / "missing.txt", "no --calibration text at")):
        assert main(["-q", "compress-model", str(folder), "--ratio", "6", "--calibration", str(bad),
                     "-o", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
