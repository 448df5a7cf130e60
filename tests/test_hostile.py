"""Hostile and careless inputs (issue 14, points 4-8), each generated here and small.

4. finite input that overflows a fit (1e37, beyond fp16) -> finite results or one clear error;
5. unchecked arguments (limits, budgets, steps, --key, terabyte configs, word2vec headers, the
   kernel switch) and a warning when the artifact outgrows the table;
6. bag arguments refused by every format in both lookup paths; unsigned id dtypes;
7. foreign and damaged sources name the file and the problem; a bad vocabulary only warns;
8. the command line: one line on stderr, nonzero exit, no traceback, quiet on a closed pipe,
   and `inspect` refuses what `load` refuses without reading a foreign file whole.
"""

import errno
import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import embcompress
from embcompress import SpecError, cli
from embcompress.budget import config_for_budget
from embcompress.data import load_table
from embcompress.kernels import _extension as kernels  # the switch is read in _extension at import
from embcompress.io import seal
from embcompress.surgery import CompressedEmbeddingBag
from helpers import synthetic_table
from method_cases import CASES

SPECS = [CASES[name][0][0] for name in embcompress.list_methods()]
FIT = {"steps": 30}  # enough to leave a finite, better-than-zero table; the conformance suite judges quality
SRC = str(Path(embcompress.__file__).resolve().parents[1])  # the package under test, for subprocesses


@pytest.fixture(params=[True, False], ids=["kernels", "torch"])
def kernel_path(request):
    previous = kernels.set_enabled(request.param)
    yield request.param
    kernels.set_enabled(previous)


def relative_error(module, weight: torch.Tensor) -> float:
    approx = module.export().materialize().double()
    return float((approx - weight.double()).pow(2).mean() / weight.double().pow(2).mean())


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert code != 0 and len(lines) == 1 and "error:" in lines[0], (code, err)
    return lines[0]


@pytest.fixture
def npy(tmp_path) -> Path:
    path = tmp_path / "table.npy"
    np.save(path, synthetic_table(64, 12, 4).numpy())
    return path


# -- 4. finite input, non-finite fits ------------------------------------------------------------

@pytest.mark.parametrize("factor", [1e37, 1e-40], ids=["huge", "tiny"])  # tiny: 1e-40 is below float32's normals
@pytest.mark.parametrize("spec", SPECS)
def test_huge_and_tiny_values_fit_scaled_and_fold_back(spec, factor):
    weight = synthetic_table(64, 12, 4) * factor
    quick = embcompress.get_method(spec.partition(":")[0]).quick_fit_options()
    module = embcompress.from_pretrained(weight, spec, **{**quick, "steps": min(quick.get("steps", 30), 30)})
    frozen = module.export()
    assert all(torch.isfinite(t).all() for t in frozen.stored_tensors().values() if t.is_floating_point())
    assert torch.isfinite(frozen.materialize()).all() and torch.isfinite(module.materialize()).all()
    assert relative_error(module, weight) < 0.95  # a real fit at that scale, not zeros


def test_dpq_vq_fits_large_values_and_refuses_beyond_its_range():
    weight = synthetic_table(64, 12, 4)
    spec = "dpq:variant=vq,groups=4,codewords=8"
    small = relative_error(embcompress.from_pretrained(weight, spec, **FIT), weight)
    large = relative_error(embcompress.from_pretrained(weight * 1e7, spec, **FIT), weight * 1e7)
    assert abs(large - small) < 0.05
    with pytest.raises(ValueError, match=r"dpq cannot fit values this large.*divide the table by"):
        embcompress.from_pretrained(weight * 1e37, spec, **FIT)


@pytest.mark.parametrize("spec", ["scalar:bits=16", "codes:books=4,codewords=8,codebook_dtype=float16"])
def test_beyond_float16_storage_is_a_clear_error(spec):
    with pytest.raises(ValueError, match=r"non-finite values in exported .*float16 storage tops out at 65504"):
        embcompress.from_pretrained(synthetic_table(64, 12, 4) * 7e4, spec, **FIT)


def test_float64_beyond_float32_is_named(tmp_path):
    with pytest.raises(ValueError, match="beyond float32's range"):
        embcompress.from_pretrained(torch.randn(20, 4, dtype=torch.float64) * 1e300, "hash:buckets=4")
    text = tmp_path / "wide.txt"
    text.write_text("a 1 2\nb 3 1e39\n")
    with pytest.raises(ValueError, match=r"wide.txt has values up to 1e\+39, beyond float32's range"):
        load_table(text)


def test_cli_compresses_a_huge_table_to_a_finite_artifact(tmp_path, capsys):
    source = tmp_path / "huge.npy"
    np.save(source, (synthetic_table(64, 12, 4) * 1e37).numpy())
    out = tmp_path / "huge.emb"
    code, report, err = run_cli(capsys, "-q", "compress", str(source), "--spec", "pq:groups=4,codewords=16",
                                "-o", str(out), "--json")
    assert code == 0, err
    assert torch.isfinite(embcompress.load(out).materialize()).all()
    report = json.loads(report)
    assert 0 <= report["rel_mse"] < 0.5 and report["mean_cosine"] > 0.7  # measured at a scale where squares fit


# -- 5. arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "-3"], ["--ratio", "0"], ["--ratio", "nan"],
                                  ["--bits-per-row", "inf"], ["--bits-per-row", "-8"], ["--bytes", "-5"],
                                  ["--steps", "-1"], ["--steps", "0"]])
def test_cli_refuses_bad_numbers(npy, tmp_path, capsys, args):
    budget = [] if any(a in args for a in ("--ratio", "--bits-per-row", "--bytes")) else ["--ratio", "4"]
    line = one_line_error(capsys, "compress", str(npy), "-m", "hash", *budget, *args, "-o", str(tmp_path / "o.emb"))
    assert args[0] in line and "positive" in line
    assert not (tmp_path / "o.emb").exists()


def test_demo_refuses_zero_rows(capsys):
    assert "--rows" in one_line_error(capsys, "demo", "--rows", "0")


def test_demo_never_writes_its_results_over_the_table(tmp_path, capsys, monkeypatch):
    from embcompress import data

    source = tmp_path / "glove.npy"
    np.save(source, synthetic_table(64, 12, 4).numpy())
    before = source.read_bytes()
    words = [f"w{i}" for i in range(64)]
    monkeypatch.setattr(data, "_glove_6b_50d", lambda: data.Table(torch.from_numpy(np.load(source)), words,
                                                                  "glove-6b-50d", [source]))
    error = one_line_error(capsys, "demo", "--methods", "scalar", "--json", str(source))
    assert "is the input" in error and source.read_bytes() == before


@pytest.mark.parametrize("budget", [{"ratio": 0}, {"ratio": float("inf")}, {"bits_per_row": float("nan")},
                                    {"bytes": -1}, {"ratio": -2.0}])
def test_budget_must_be_positive_and_finite(budget):
    with pytest.raises(ValueError, match="must be a positive finite number"):
        config_for_budget("codes", 1000, 16, **budget)


def test_load_table_refuses_a_bad_limit(npy):
    for limit in (0, -3, 2.5):
        with pytest.raises(ValueError, match="limit must be a positive number of rows"):
            load_table(npy, limit=limit)
    assert load_table(npy, limit=5).weight.shape == (5, 12)


def test_key_on_a_source_without_keys(npy, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"key 'w'.*table.npy is a NumPy array.*drop the key"):
        load_table(npy, key="w")
    line = one_line_error(capsys, "compress", str(npy), "-m", "hash", "--ratio", "4", "--key", "w",
                          "-o", str(tmp_path / "o.emb"))
    assert "drop the key" in line


@pytest.mark.parametrize("spec", ["hash:buckets=1000000000000", "memcom:buckets=1000000000000",
                                  "tt:cores=3,rank=100000"])
def test_terabyte_configs_are_refused_before_allocating(spec):
    with pytest.raises(SpecError, match=r"would store [\d,.]+ GB .* more than this machine's"):
        embcompress.build(spec, 1000, 64)


def test_word2vec_header_must_match_the_rows(tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("3 2\na 1 2\nb 3 4\n")
    with pytest.raises(ValueError, match=r"header announces 3 rows but the file holds 2"):
        load_table(rows)
    assert load_table(rows, limit=2).weight.shape == (2, 2)  # a limit below the count reads only those
    width = tmp_path / "width.txt"
    width.write_text("2 3\na 1 2\nb 3 4\n")
    with pytest.raises(ValueError, match=r"width.txt: line 2 has 2 values, expected 3 \(as its word2vec header"):
        load_table(width)


@pytest.mark.parametrize("value, enabled", [("0", False), ("false", False), ("No", False), ("OFF", False),
                                            ("1", True), ("yes", True), ("on", True), ("", True), (None, True)])
def test_kernel_switch_reads_like_a_boolean(value, enabled):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels._enabled_from_environment(value) is enabled


def test_unknown_kernel_switch_warns():
    with pytest.warns(UserWarning, match=r"EMBCOMPRESS_KERNELS='maybe' is not a switch"):
        assert kernels._enabled_from_environment("maybe") is True


def test_kernel_switch_false_turns_the_kernels_off_at_import(monkeypatch):
    try:
        monkeypatch.setenv("EMBCOMPRESS_KERNELS", "false")
        importlib.reload(kernels)  # the switch is read once, at import
        assert not kernels.enabled()
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)


def test_an_artifact_larger_than_the_table_warns(npy, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"stores 1,600 bytes, more than the fp32 table's 160"):
        embcompress.from_pretrained(torch.randn(10, 4), "hash:buckets=100")
    code, _, err = run_cli(capsys, "-q", "compress", str(npy), "--spec", "hash:buckets=500", "--no-eval",
                           "-o", str(tmp_path / "big.emb"))
    assert code == 0 and "warning:" in err and "more than the fp32 table" in err


# -- 6. bags ---------------------------------------------------------------------------------------

IDS = torch.tensor([1, 2, 3, 4])
BAD_BAGS = [
    ("decreasing offsets", dict(ids=IDS, offsets=torch.tensor([0, 3, 1])), ValueError, "never decreasing"),
    ("negative offsets", dict(ids=IDS, offsets=torch.tensor([0, -1, 2])), ValueError, "never decreasing"),
    ("offsets not from 0", dict(ids=IDS, offsets=torch.tensor([1, 2])), ValueError, "0 first"),
    ("offsets past the ids", dict(ids=IDS, offsets=torch.tensor([0, 5])), ValueError, "at most the number of ids"),
    ("float offsets", dict(ids=IDS, offsets=torch.tensor([0.0, 2.0])), TypeError, "offsets must be an integer"),
    ("2-D offsets", dict(ids=IDS, offsets=torch.tensor([[0, 2]])), ValueError, "offsets must be 1-D"),
    ("short weights", dict(ids=IDS, offsets=torch.tensor([0, 2]), per_sample_weights=torch.ones(3)), ValueError,
     "shape of ids"),
    ("integer weights", dict(ids=IDS, offsets=torch.tensor([0, 2]), per_sample_weights=torch.ones(4, dtype=torch.long)),
     TypeError, "floating-point"),
    ("flat weights for 2-D ids", dict(ids=IDS.view(2, 2), per_sample_weights=torch.ones(4)), ValueError,
     "shape of ids"),
    ("weights in mean mode", dict(ids=IDS, offsets=torch.tensor([0, 2]), per_sample_weights=torch.ones(4),
                                  mode="mean"), ValueError, "mode='sum' only"),
]


@pytest.mark.parametrize("spec", SPECS)
def test_bad_bags_are_refused_by_every_format_in_both_paths(spec, kernel_path):
    table = embcompress.build(spec, 50, 8)
    frozen, wrapper = table.export(), CompressedEmbeddingBag(table, mode="sum")
    for label, case, error, message in BAD_BAGS:
        mode = case.get("mode", "sum")
        with pytest.raises(error, match=message):
            frozen.bag(case["ids"], case.get("offsets"), case.get("per_sample_weights"), mode=mode)
        wrapper.mode = mode
        with pytest.raises(error, match=message):
            wrapper(case["ids"], case.get("offsets"), case.get("per_sample_weights"))


@pytest.mark.parametrize("spec", SPECS)
def test_empty_bags_are_zeros_in_both_paths(spec, kernel_path):
    table = embcompress.build(spec, 50, 8).eval()
    frozen, wrapper = table.export(), CompressedEmbeddingBag(table, mode="sum")
    for mode in ("sum", "mean", "max"):
        wrapper.mode = mode
        for ids, offsets, bags in [(torch.zeros(3, 0, dtype=torch.long), None, 3),  # nn.EmbeddingBag raises here
                                   (torch.zeros(0, 2, dtype=torch.long), None, 0),
                                   (torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), 2)]:
            for out in (frozen.bag(ids, offsets, mode=mode), wrapper(ids, offsets)):
                assert out.shape == (bags, 8) and not out.any()


def test_include_last_offset_must_end_at_the_id_count():
    wrapper = CompressedEmbeddingBag(embcompress.build("hash:buckets=8", 50, 8), include_last_offset=True)
    assert wrapper(IDS, torch.tensor([0, 2, 4])).shape == (2, 8)
    with pytest.raises(ValueError, match=r"exactly the number of ids \(4\) last"):
        wrapper(IDS, torch.tensor([0, 2, 3]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("spec", SPECS)
def test_unsigned_ids_work_in_forward_and_bag(spec, dtype, kernel_path):
    table = embcompress.build(spec, 50, 8).eval()
    frozen = table.export()
    ids = torch.tensor([[1, 7, 49], [0, 3, 3]])
    for module in (table, frozen):
        torch.testing.assert_close(module(ids.to(dtype)), module(ids))
    torch.testing.assert_close(frozen.bag(ids.to(dtype), mode="sum"), frozen.bag(ids, mode="sum"))
    wrapper = CompressedEmbeddingBag(table, mode="mean")
    torch.testing.assert_close(wrapper(ids.to(dtype)), wrapper(ids))


def test_uint64_ids_past_int64_are_out_of_range():
    frozen = embcompress.build("hash:buckets=8", 50, 8).export()
    with pytest.raises(IndexError, match=r"id 9223372036854775813 is out of range"):
        frozen(torch.tensor([2 ** 63 + 5], dtype=torch.uint64))


# -- 7. foreign and damaged sources ------------------------------------------------------------

def model_folder(tmp_path: Path, rows: int = 6) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"embeddings.word_embeddings.weight": np.random.rand(rows, 4).astype("f4")},
              str(folder / "model.safetensors"))
    return folder


def test_corrupt_model_safetensors_names_the_file(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        load_table(folder)
    line = one_line_error(capsys, "compress", str(folder), "-m", "hash", "--ratio", "4", "-o", str(tmp_path / "o.emb"))
    assert "model.safetensors" in line


@pytest.mark.parametrize("name, content, problem", [
    ("tokenizer.json", b"{not json", "is not valid JSON"),
    ("tokenizer.json", b'{"model": {"vocab": {"a": "zero"}}}', "cannot be read"),
    ("vocab.txt", b"\xff\xfebad\n" * 6, "is not UTF-8 text"),
    ("vocab.txt", b"a\nb\n", "has 2 entries for 6 rows"),
])
def test_a_bad_vocabulary_warns_and_the_table_loads(tmp_path, name, content, problem):
    folder = model_folder(tmp_path)
    (folder / name).write_bytes(content)
    with pytest.warns(UserWarning, match=f"{name} {problem}.*; loading the table without words"):
        table = load_table(folder)
    assert table.weight.shape == (6, 4) and table.words is None


def test_a_bad_vocabulary_does_not_stop_the_cli(tmp_path, capsys):
    folder = model_folder(tmp_path)
    (folder / "vocab.txt").write_bytes(b"\xff\xfe\n" * 6)
    code, _, err = run_cli(capsys, "-q", "compress", str(folder), "-m", "hash", "--ratio", "2", "--no-eval",
                           "-o", str(tmp_path / "o.emb"))
    assert code == 0 and "vocab.txt is not UTF-8 text" in err


def test_text_named_npy_and_pickled_npy_are_named(tmp_path):
    text = tmp_path / "vectors.npy"
    text.write_text("a 1 2\nb 3 4\n")
    with pytest.raises(ValueError, match=r"vectors.npy is not a NumPy .npy file"):
        load_table(text)
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects.npy holds pickled Python objects, which are never unpickled"):
        load_table(pickled)
    truncated = tmp_path / "cut.npy"
    np.save(truncated, np.ones((8, 4), dtype="f4"))
    truncated.write_bytes(truncated.read_bytes()[:90])
    with pytest.raises(ValueError, match=r"cut.npy is not a readable .npy array"):
        load_table(truncated)


@pytest.mark.parametrize("name", ["table.npy", "vectors.txt", "table.safetensors", "model/model.safetensors"])
def test_a_fifo_source_is_refused_not_read(tmp_path, name):
    fifo = tmp_path / name
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    source = fifo.parent if name.startswith("model/") else fifo  # reading either would block forever
    with pytest.raises((ValueError, FileNotFoundError), match="FIFO|no .safetensors weights"):
        load_table(source)


def test_big_endian_npy_is_converted(tmp_path):
    values = np.arange(24, dtype="f4").reshape(6, 4)
    path = tmp_path / "big.npy"
    np.save(path, values.astype(">f4"))
    torch.testing.assert_close(load_table(path).weight, torch.from_numpy(values))
    torch.testing.assert_close(load_table(path, limit=2).weight, torch.from_numpy(values[:2]))


def test_tab_separated_vectors_load(tmp_path):
    path = tmp_path / "tabs.txt"
    path.write_text("2 3\nthe\t0.5\t1\t2\r\nof\t3 4 5\n")
    table = load_table(path)
    assert table.words == ["the", "of"]
    torch.testing.assert_close(table.weight, torch.tensor([[0.5, 1, 2], [3, 4, 5]]))


# -- 8. one error style at the command line ---------------------------------------------------

def test_usage_errors_are_one_line(capsys):
    assert "-o/--output" in one_line_error(capsys, "compress", "x.npy", "-m", "hash")  # no -o
    assert "invalid choice" in one_line_error(capsys, "compres", "x.npy")


def test_directories_as_input_and_output(npy, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .safetensors weights" in one_line_error(capsys, "compress", str(empty), "-m", "hash", "--ratio", "4",
                                                       "-o", str(tmp_path / "o.emb"))
    line = one_line_error(capsys, "compress", str(npy), "-m", "hash", "--ratio", "4", "-o", str(tmp_path))
    assert "is a directory" in line and "give a file path" in line
    assert "is not a file" in one_line_error(capsys, "inspect", str(tmp_path))
    line = one_line_error(capsys, "compress", str(npy), "-m", "hash", "--ratio", "4", "-o", str(npy / "o.emb"))
    assert "table.npy" in line and "not a directory" in line.lower()


@pytest.mark.parametrize("failure, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
])
def test_write_failures_are_one_line_and_leave_nothing(npy, tmp_path, capsys, monkeypatch, failure, words):
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def failing(*_args, **_kwargs):  # the disk fills up (or turns out read-only) during the write
        raise failure

    monkeypatch.setattr(os, "fsync", failing)
    line = one_line_error(capsys, "-q", "compress", str(npy), "-m", "hash", "--ratio", "4", "--no-eval",
                          "-o", str(out_dir / "t.emb"))
    assert words in line.lower() and "t.emb" in line and ".tmp" not in line
    assert list(out_dir.iterdir()) == []  # no artifact, no temporary file


def test_unreadable_input_is_one_line(npy, tmp_path, capsys, monkeypatch):
    def denied(path, *_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(np, "load", denied)
    line = one_line_error(capsys, "compress", str(npy), "-m", "hash", "--ratio", "4", "-o", str(tmp_path / "o.emb"))
    assert "permission denied" in line and "table.npy" in line


def test_a_closed_pipe_ends_quietly(npy, tmp_path):
    artifact = tmp_path / "t.emb"
    embcompress.save(embcompress.from_pretrained(load_table(npy).weight, "scalar:bits=8").export(), artifact)
    env = {**os.environ, "PYTHONPATH": SRC}
    command = f"{sys.executable} -m embcompress.cli inspect --json {artifact} | head -c 1"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout == "{" and result.stderr == ""


def test_inspect_refuses_a_resealed_header_that_load_refuses(tmp_path, capsys):
    from safetensors.torch import load_file, save_file as save_tensors

    good = tmp_path / "good.emb"
    embcompress.save(embcompress.build("scalar:bits=8", 20, 4).export(), good)
    tensors = load_file(str(good))
    with open(good, "rb") as handle:
        meta = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    header = json.loads(meta["embcompress"])
    fields = {k: v for k, v in header.items() if k not in ("kind", "format_version", "library_version",
                                                           "torch_version", "sha256")}
    fields["num_embeddings"] = 10 ** 6  # re-sealed: the checksum holds, the tensors do not fit the shape
    bad = tmp_path / "bad.emb"
    save_tensors(tensors, str(bad), metadata={"embcompress": json.dumps(seal("frozen", fields, tensors))})
    with pytest.raises(embcompress.ArtifactError, match="does not match its header"):
        embcompress.load(bad)
    assert "does not match its header" in one_line_error(capsys, "inspect", str(bad))
    code, out, _ = run_cli(capsys, "inspect", str(good))
    assert code == 0 and "scalar" in out and "x smaller than fp32" in out
    trainable = tmp_path / "trainable.emb"  # holds its fp32 training state: larger than the table
    embcompress.save(embcompress.build("scalar:bits=8", 20, 4), trainable)
    code, out, _ = run_cli(capsys, "inspect", str(trainable))
    assert code == 0 and "1.0x the size of fp32" in out


def test_inspect_decides_on_a_huge_foreign_file_without_reading_it(tmp_path, capsys, monkeypatch):
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as handle:
        handle.write((2 ** 40).to_bytes(8, "little"))  # claims a terabyte of header
        handle.truncate(2 ** 30)  # sparse: a gigabyte that takes no disk

    def whole_file(self, *_args):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(Path, "read_bytes", whole_file)
    refused = re.compile(r"not an embcompress artifact|not a readable safetensors file")
    assert refused.search(one_line_error(capsys, "inspect", str(huge)))
    npy = tmp_path / "t.npy"
    np.save(npy, np.ones((4, 4), dtype="f4"))
    assert refused.search(one_line_error(capsys, "inspect", str(npy)))
    assert refused.search(one_line_error(capsys, "evaluate", str(huge), "--against", str(npy)))


@pytest.mark.parametrize("failure, words", [(RuntimeError("boom"), "internal error: RuntimeError: boom"),
                                            (RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                                             "out of memory; use --limit")])
def test_unexpected_failures_are_one_line(capsys, monkeypatch, failure, words):
    def failing(args):
        raise failure

    monkeypatch.setattr(cli, "cmd_methods", failing)
    assert words in one_line_error(capsys, "methods")
    monkeypatch.setenv("EMBCOMPRESS_DEBUG", "1")
    if "boom" in str(failure):
        with pytest.raises(RuntimeError, match="boom"):  # the traceback, on request
            cli.main(["methods"])


def test_hf_model_folders_fail_with_the_folder_named(tmp_path):
    pytest.importorskip("transformers")
    from embcompress import hf

    with pytest.raises(FileNotFoundError, match=r"nope is not a model folder \(no config.json\)"):
        hf.load_minilm(tmp_path / "nope")
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 8,
                                                    "vocab_size": 10}))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"damaged: the model could not be loaded .*re-download"):
        hf.load_minilm(folder)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        hf.tokenize_batches(None, ["a sentence"], batch_size=0)
    with pytest.raises(ValueError, match="got no texts"):
        hf.encode(None, None, [])


@pytest.mark.parametrize("spec,factor", [("scalar:bits=4,block=8", 1e-7), ("scalar:bits=2,block=8,offset=true", 1e-7),
                                         ("scalar:bits=8", 1e-44), ("scalar:bits=4", 1e-44)])
def test_scalar_refuses_values_its_scales_would_round_to_zero(spec, factor):
    weight = synthetic_table(64, 12, 4) * factor
    with pytest.raises(ValueError, match=r"too small for (fp16 block|float32 row) scales.*multiply the table"):
        embcompress.from_pretrained(weight, spec)
    trained = embcompress.build(spec, 64, 12)  # a trained module with such weights is refused at export too
    with torch.no_grad():
        trained.weight.copy_(weight)
    with pytest.raises(ValueError, match="too small"):
        trained.export()


def test_scalar_block_minimums_beyond_float16_are_named():
    with pytest.raises(ValueError, match=r"exceed the fp16 block minimums' range.*scalar:bits=8"):
        embcompress.from_pretrained(synthetic_table(64, 12, 4) * 1e6, "scalar:bits=4,block=8,offset=true")


@pytest.mark.parametrize("spec", ["scalar:bits=4,block=8", "scalar:bits=4,block=8,offset=true", "scalar:bits=8"])
def test_scalar_keeps_small_but_representable_tables(spec):
    weight = synthetic_table(64, 12, 4) * 1e-5
    assert relative_error(embcompress.from_pretrained(weight, spec), weight) < 0.2
