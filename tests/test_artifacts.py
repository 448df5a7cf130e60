"""Artifacts: one bundle format, safetensors + JSON, no pickle; old files load, bad files get clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import embcompress
from embcompress import ArtifactError
from embcompress.bitpack import pack_codes, packed_size, unpack_codes
from embcompress.distill import _load_checkpoint
from embcompress import kernels
from embcompress.io import FORMAT_VERSION, read_header
from fixtures.make_fixtures import FROZEN, FixtureClassifier, FixtureModel, model_input

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def artifact(tmp_path):
    table = embcompress.from_pretrained(torch.randn(64, 8), "scalar:bits=4")
    return embcompress.save(table.export(), tmp_path / "t.emb")


def raw_header(path):
    raw = path.read_bytes()
    return json.loads(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["embcompress"])


# -- files written by format 1 (the release before the bundle format) still load ----------------
@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "expected.safetensors")


@pytest.mark.parametrize("name", [*FROZEN, "trainable"])
def test_format_1_artifacts_load_with_identical_outputs(name, expected):
    module = embcompress.load(FIXTURES / f"{name}.emb").eval()
    out = module(torch.arange(24))
    if kernels.enabled():  # the fixtures' outputs came from the C lookups: bit for bit
        assert torch.equal(out, expected[name])
    else:  # the torch path of factors and tt sums in another order
        torch.testing.assert_close(out, expected[name], rtol=1e-4, atol=1e-5)
    if name != "trainable":  # the post hoc path of format 1 recorded the spec: it is the module's now
        assert module.spec == raw_header(FIXTURES / f"{name}.emb")["spec"]


def test_format_1_pretrained_folder_loads_with_identical_outputs(expected):
    model = FixtureModel()
    report = embcompress.load_pretrained(model, FIXTURES / "pretrained")
    assert sorted(report.replaced) == ["bag", "tok"] and model.head.table is model.tok
    model.eval()
    assert torch.equal(model(model_input()), expected["pretrained"])


def test_format_1_checkpoint_loads_with_identical_outputs(expected):
    saved = json.loads((FIXTURES / "checkpoint" / "distill.json").read_text())
    torch.manual_seed(22)
    student = FixtureClassifier()
    embcompress.compress_(student, "lowrank:rank=2", init="random")
    params = [dict(student.named_parameters())[n] for n in saved["settings"]["params"]]
    optimizer = torch.optim.Adam(params)
    step, _, _, losses = _load_checkpoint(FIXTURES / "checkpoint", student, optimizer, torch.Generator(),
                                          saved["settings"])
    assert step == 2 and len(losses) == 2
    student.eval()
    assert torch.equal(student(model_input()), expected["checkpoint"])


# -- the header: versions, spec and fit settings, authenticated -----------------------------------
def test_header_records_versions_spec_and_fit(artifact):
    header = raw_header(artifact)
    assert header["format_version"] == FORMAT_VERSION == 2 and header["library_version"] == embcompress.__version__
    assert header["kind"] == "frozen" and header["format"] == "scalar"
    assert header["spec"] == "scalar:bits=4,block=0,offset=false"  # set by export(), not patched on by a caller


def test_post_hoc_artifact_tells_how_it_was_made(tmp_path, capsys):
    from embcompress.data import Table
    from embcompress.posthoc import compress_table

    table = Table(torch.randn(40, 8), None, "t")
    result = compress_table(table, "pq:groups=2,codewords=5", fit_options={"iters": 3}, evaluate=False)
    path = embcompress.save(result.frozen, tmp_path / "pq.emb")
    header, _ = read_header(path)
    # The resolved fit settings: every field of pq's Fit, the drawn seed included.
    assert header["spec"] == "pq:groups=2,codewords=5,rotation=none" and header["fit"] == result.module.fit_settings
    assert header["fit"]["iters"] == 3 and set(header["fit"]) == {"steps", "iters", "sample", "seed"}
    loaded = embcompress.load(path)
    assert loaded.spec == header["spec"] and loaded.fit_settings == header["fit"]
    from embcompress.cli import main

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pq:groups=2,codewords=5" in out and '"iters": 3' in out


def test_trainable_artifact_keeps_fit_settings(tmp_path):
    table = embcompress.from_pretrained(torch.randn(30, 8), "lowrank:rank=2")
    table.fit_settings = {"steps": 4}
    loaded = embcompress.load(embcompress.save(table, tmp_path / "t.emb"))
    assert loaded.fit_settings == {"steps": 4} and loaded.export().fit_settings == {"steps": 4}


def test_truncated_file(artifact):
    raw = artifact.read_bytes()
    artifact.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        embcompress.load(artifact)


def test_tampered_tensor(artifact):
    raw = bytearray(artifact.read_bytes())
    raw[-5] ^= 0xFF
    artifact.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        embcompress.load(artifact)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(3, 3)}, path)
    with pytest.raises(ArtifactError, match="not an embcompress artifact"):
        embcompress.load(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "x.emb"
    path.write_bytes(b"\x80\x04pickle-like bytes")
    with pytest.raises(ArtifactError):
        embcompress.load(path)
    with pytest.raises(FileNotFoundError):
        embcompress.load(tmp_path / "missing.emb")


def test_newer_format_is_refused_with_a_hint(tmp_path):
    table = embcompress.build("hash:buckets=4", 10, 4)
    from embcompress.io import seal

    path = tmp_path / "new.emb"
    header = seal("frozen", {}, {})
    header["format_version"] = 99
    save_file({"table": table.export().table}, path, metadata={"embcompress": json.dumps(header)})
    with pytest.raises(ArtifactError, match="reads 1 to 2.*pip install -U"):
        embcompress.load(path)


# -- one write protocol: atomic, nothing partial ----------------------------------------------------
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.emb"
    table = embcompress.build("hash:buckets=4", 10, 4)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        embcompress.save(table, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = embcompress.save(embcompress.build("hash:buckets=4", 10, 4), tmp_path / "out.emb")
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        embcompress.save(embcompress.build("hash:buckets=8", 10, 4), path, overwrite=True)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_files_get_the_umask_mode_not_0600(tmp_path):
    path = embcompress.save(embcompress.build("hash:buckets=4", 10, 4), tmp_path / "out.emb")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_pretrained_twice_needs_overwrite(tmp_path):
    torch.manual_seed(0)
    model = FixtureModel()
    embcompress.compress_(model, "scalar:bits=8")
    folder = embcompress.save_pretrained(model, tmp_path / "m")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        embcompress.save_pretrained(model, folder)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    embcompress.save_pretrained(model, folder, overwrite=True)
    assert len(list(folder.glob("tables-*.safetensors"))) == 1  # the previous tensors are swept
    fresh = FixtureModel()
    embcompress.load_pretrained(fresh, folder)
    assert torch.equal(fresh.head.bias, model.head.bias)


def test_damaged_checkpoint_is_an_artifact_error(tmp_path):
    torch.manual_seed(0)
    teacher = FixtureClassifier()
    student = FixtureClassifier()
    embcompress.compress_(student, "lowrank:rank=2", init="random")
    options = dict(steps=2, checkpoint=tmp_path / "ck", progress=False)
    embcompress.distill(student, teacher, [model_input()], **options)
    state = next((tmp_path / "ck").glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:-7])  # truncated: safetensors' own error must not escape
    with pytest.raises(ArtifactError, match="truncated or corrupt.*resume=False"):
        embcompress.distill(student, teacher, [model_input()], steps=3, checkpoint=tmp_path / "ck",
                            progress=False)


def test_checkpoint_and_pretrained_headers_are_authenticated(tmp_path):
    torch.manual_seed(0)
    teacher = FixtureClassifier()
    student = FixtureClassifier()
    embcompress.compress_(student, "lowrank:rank=2", init="random")
    embcompress.distill(student, teacher, [model_input()], steps=2, checkpoint=tmp_path / "ck", progress=False)
    path = tmp_path / "ck" / "distill.json"
    path.write_text(path.read_text().replace('"position": 1', '"position": 0'))
    with pytest.raises(ArtifactError, match="header or tensor checksum mismatch"):
        embcompress.distill(student, teacher, [model_input()], steps=3, checkpoint=tmp_path / "ck", progress=False)

    model = FixtureModel()
    embcompress.compress_(model, "scalar:bits=8")
    folder = embcompress.save_pretrained(model, tmp_path / "m")
    config = folder / "embcompress.json"
    config.write_text(config.read_text().replace('"padding_idx": 0', '"padding_idx": 3'))
    with pytest.raises(ArtifactError, match="header or tensor checksum mismatch"):
        embcompress.load_pretrained(FixtureModel(), folder)


def test_format_1_file_still_loads_in_a_fresh_process():
    # The fixtures were written by the format-1 writer: no pickle, no import of the test helpers needed.
    script = (f"import torch, embcompress; m = embcompress.load({str(FIXTURES / 'tt.emb')!r}); "
              "print(tuple(m(torch.arange(3)).shape))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "EMBCOMPRESS_QUIET": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 8)"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 11, 16])
@pytest.mark.parametrize("books", [1, 3, 8])
def test_bitpack_round_trip(bits, books):
    rows = 37
    codes = torch.randint(0, 1 << bits, (rows, books))
    packed = pack_codes(codes, bits, chunk_rows=8)
    assert packed.numel() == packed_size(rows, books, bits) == (rows * books * bits + 7) // 8
    order = torch.randperm(rows)
    assert torch.equal(unpack_codes(packed, order, books, bits), codes[order])


def test_bitpack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="fit 3 bits"):
        pack_codes(torch.tensor([[8]]), 3)


def test_every_post_hoc_entry_records_its_fit_settings(tmp_path):
    table = embcompress.from_pretrained(torch.randn(30, 8), "pq:groups=2,codewords=4", iters=2)
    assert table.fit_settings["iters"] == 2  # resolved: every field of pq's Fit, the drawn seed included
    assert embcompress.load(embcompress.save(table.export(), tmp_path / "t.emb")).fit_settings == table.fit_settings
    model = FixtureModel()
    embcompress.compress_(model, {"tok": "pq:groups=2,codewords=4", "bag": "skip"}, fit_options={"iters": 2})
    header = json.loads((embcompress.save_pretrained(model, tmp_path / "m") / "embcompress.json").read_text())
    recorded = header["tables"][0]["fit"]
    assert recorded == model.tok.fit_settings and recorded["iters"] == 2
    assert header["tables"][0]["spec"].startswith("pq:")
    fresh = FixtureModel()
    embcompress.load_pretrained(fresh, tmp_path / "m")
    assert fresh.tok.fit_settings == recorded


def test_a_hand_built_format_module_saves_without_a_spec(tmp_path, capsys):
    from embcompress.cli import main
    from embcompress.frozen import FrozenCodebook

    table = FrozenCodebook.from_codes(torch.randint(0, 4, (24, 2)), torch.randn(2, 4, 4), "concat")
    path = embcompress.save(table, tmp_path / "hand.emb")
    header, _ = read_header(path)
    assert "spec" not in header and "fit" not in header
    assert embcompress.load(path).spec is None
    source = tmp_path / "dense.npy"  # evaluate names the method from the spec, or else the format
    np.save(source, table.materialize().numpy())
    assert main(["evaluate", str(path), "--against", str(source), "--no-analogy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "codebook"
