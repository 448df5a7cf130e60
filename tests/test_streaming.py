"""Tables larger than memory: streamed post hoc compression (embcompress.streaming)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import embcompress
from embcompress import streaming
from embcompress.cli import main
from embcompress.data import Table, open_table_mmap
from embcompress.posthoc import compress_table
from embcompress.streaming import compress_mapped, sample_ids

ROOT = Path(__file__).resolve().parents[1]


def structured(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((rows, 4)) @ rng.standard_normal((4, dim))
    return (low + 0.3 * rng.standard_normal((rows, dim))).astype(np.float32)


@pytest.fixture
def table_file(tmp_path):
    path = tmp_path / "table.npy"
    np.save(path, structured(3000, 16))
    return path


# Streamed and in-memory fits on a table small enough for both. The codebook methods fit a sample
# (here 1,000 of the 3,000 rows) and encode every row; hash, MEmCom and scalar do what the in-memory
# fit does, in passes, and must match it.
CASES = [
    ("pq:groups=4,codewords=16", {"iters": 10}, 0.05),
    ("pq:groups=4,codewords=16,rotation=pca", {"iters": 10}, 0.05),  # the basis from the sample, then every row
    ("dpq:variant=vq,groups=4,codewords=16", {"steps": 10}, 0.05),
    # codes: least-squares codebooks fit to the sample alone (in memory: to every row); 5.8% worse here
    ("codes:books=3,codewords=16", {"rounds": 1, "beam": 2, "polish": 1, "search": 1}, 0.10),
    ("scalar:bits=4", {}, 1e-6),
    ("hash:buckets=100", {}, 1e-6),
    ("memcom:buckets=100,bias=true", {"steps": 5}, 1e-6),
]


@pytest.mark.parametrize("spec,fit,slack", CASES, ids=[c[0].partition(":")[0] for c in CASES])
def test_streamed_artifact_matches_in_memory_quality(table_file, tmp_path, spec, fit, slack):
    weight = torch.from_numpy(np.load(table_file))
    memory = compress_table(Table(weight, None, "t"), spec, fit_options=fit, neighbours=False, analogy=False,
                            words=False).report
    out = tmp_path / "streamed.emb"
    with open_table_mmap(table_file) as table:
        report = compress_mapped(table, spec, output=out, sample=1000, chunk=512, fit_options=fit).report
    loaded = embcompress.load(out)
    decoded = loaded.materialize()
    spread = (weight - weight.mean(0)).pow(2).mean()
    rel_mse = float((decoded - weight).pow(2).mean() / spread)
    assert rel_mse == pytest.approx(report["rel_mse"], rel=1e-4)  # the chunked figure is the file's
    assert report["bytes"] == memory["bytes"] == loaded.num_bytes()
    assert rel_mse <= memory["rel_mse"] * (1 + slack) + 1e-6


def test_from_pretrained_takes_np_memmap_and_returns_the_frozen_table(table_file):
    mapped = np.load(table_file, mmap_mode="r")
    frozen = embcompress.from_pretrained(mapped, "scalar:bits=8", padding_idx=3, chunk=512)
    assert isinstance(frozen, embcompress.FrozenEmbedding) and frozen.padding_idx == 3
    expected = embcompress.from_pretrained(torch.from_numpy(np.load(table_file)), "scalar:bits=8").export()
    ids = torch.tensor([0, 1, 2, 1500, 2999])
    assert torch.equal(frozen(ids[ids != 3]), expected(ids[ids != 3]))
    assert torch.equal(frozen(torch.tensor([3])), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="not a slice"):
        embcompress.from_pretrained(mapped[:10], "pq")


def test_safetensors_source_in_half_precision(tmp_path):
    weight = torch.from_numpy(structured(500, 8)).to(torch.bfloat16)
    save_file({"emb": weight, "bias": torch.zeros(8)}, tmp_path / "m.safetensors")
    with open_table_mmap(tmp_path / "m.safetensors") as table:
        assert table.shape == (500, 8)
        assert torch.equal(table.rows(10, 20), weight[10:20].float())
        frozen = compress_mapped(table, "scalar:bits=16").frozen
    assert torch.equal(frozen.materialize(), weight.float().half().float())
    save_file({"a": weight, "b": weight.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="choose one with --key"):
        open_table_mmap(tmp_path / "two.safetensors")


def test_methods_that_cannot_stream_name_those_that_can(table_file):
    with open_table_mmap(table_file) as table, pytest.raises(ValueError, match="streaming methods: codes, dpq"):
        compress_mapped(table, "tt")


def test_writer_leaves_no_temp_file_when_interrupted(table_file, tmp_path, monkeypatch):
    out = tmp_path / "out" / "table.emb"
    out.parent.mkdir()
    out.write_bytes(b"previous artifact")
    calls = []
    original = streaming._ScalarEncoder.encode

    def interrupted(self, rows, start):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, rows, start)

    monkeypatch.setattr(streaming._ScalarEncoder, "encode", interrupted)
    with open_table_mmap(table_file) as table, pytest.raises(KeyboardInterrupt):
        compress_mapped(table, "scalar:bits=8", output=out, chunk=512, overwrite=True)
    assert len(calls) == 3
    assert [p.name for p in out.parent.iterdir()] == ["table.emb"]
    assert out.read_bytes() == b"previous artifact"


def test_sample_ids():
    uniform = sample_ids(1000, 100, "uniform", seed=1)
    assert len(np.unique(uniform)) == 100 and np.all(np.diff(uniform) > 0)
    frequency = sample_ids(1000, 100, "frequency", seed=1)
    assert np.array_equal(frequency[:50], np.arange(50)) and np.all(frequency[50:] >= 50)
    assert len(np.unique(frequency)) == 100
    assert np.array_equal(sample_ids(10, 100), np.arange(10))
    with pytest.raises(ValueError, match="sample_order"):
        sample_ids(10, 5, "zipf")


def test_cli_streams_and_refuses_what_it_cannot(table_file, tmp_path, capsys):
    out = tmp_path / "t.emb"
    assert main(["-q", "compress", str(table_file), "-m", "pq", "--bits-per-row", "32", "--stream",
                 "--sample", "800", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["streamed"] and report["rows"] == 3000 and embcompress.load(out).num_embeddings == 3000
    other = tmp_path / "other.emb"
    assert main(["-q", "compress", str(table_file), "-m", "tt", "--stream", "-o", str(other)]) == 2
    assert "streaming methods: codes, dpq, pq, scalar, hash, memcom" in capsys.readouterr().err
    assert main(["-q", "compress", str(table_file), "-m", "pq", "--stream", "--trainable", "-o", str(other)]) == 2
    assert "--stream writes the frozen artifact only" in capsys.readouterr().err
    assert not other.exists()
    assert main(["-q", "compress", str(table_file), "-m", "scalar", "--stream", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err  # io's output rules hold for streamed writes too


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from embcompress.data import open_table_mmap
    from embcompress.streaming import compress_mapped, peak_rss_bytes

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    path, out = sys.argv[1], sys.argv[2]
    spec, options = "pq:groups=16,codewords=16", {"output": out, "sample": 4096, "chunk": 8192, "overwrite": True,
                                                  "fit_options": {"iters": 3}}
    with open_table_mmap(path, limit=20000) as head:  # code paths loaded once before the baseline
        compress_mapped(head, spec, **options)
    base = rss()
    with open_table_mmap(path) as table:
        report = compress_mapped(table, spec, **options).report
    streamed = peak_rss_bytes()
    total = float(np.load(path, mmap_mode="r").sum(dtype=np.float64))  # control: the whole map resident
    print(json.dumps({"base": base, "streamed": streamed, "control": peak_rss_bytes(), "rows": report["rows"]}))
""")


def test_streamed_peak_memory_stays_well_below_the_table(tmp_path):
    rows, dim = 600_000, 128  # 307 MB of fp32, written in chunks
    path = tmp_path / "big.npy"
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        for _ in range(0, rows, 100_000):
            handle.write(rng.standard_normal((100_000, dim), dtype=np.float32).tobytes())
    table_bytes = rows * dim * 4
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / "big.emb")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert figures["rows"] == rows
    assert figures["streamed"] - figures["base"] < table_bytes / 4, figures
    # The measurement counts mapped file pages: reading the whole map raises the peak by ~the table.
    assert figures["control"] - figures["base"] > 0.8 * table_bytes, figures


def test_compress_table_streams_a_mapped_table(table_file):
    with open_table_mmap(table_file) as table:
        result = compress_table(table, "hash", ratio=8)
    assert result.module is None and result.report["streamed"]
    weight = torch.from_numpy(np.load(table_file))
    in_memory = compress_table(Table(weight, None, "t"), "hash", ratio=8, neighbours=False, analogy=False)
    # bucket means summed in float64 here, in float32 in memory
    assert torch.allclose(result.frozen.materialize(), in_memory.frozen.materialize(), atol=1e-6)
    assert result.report["rel_mse"] == pytest.approx(in_memory.report["rel_mse"], rel=1e-5)
