"""Hostile and careless inputs to the artifact layer, generated here and small (issue 14, classes 1-3).

1. outputs that would destroy things: the input itself, devices, FIFOs, links, directories,
   existing artifacts, SIGTERM mid-write, long names, non-finite tensors;
2. headers: one flipped byte is refused, and every field's JSON type and range is checked
   before a module is built (headers re-sealed here, so only the validation stands between);
3. stored codes that would decode to the wrong codeword.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import embcompress
from embcompress import ArtifactError
from embcompress.bitpack import pack_codes
from embcompress.cli import main
from embcompress.frozen import FrozenCodebook
from embcompress.io import OutputError, read_header, seal

SRC = Path(__file__).resolve().parents[1] / "src"


def frozen(spec="hash:buckets=4", rows=10, dim=4, padding_idx=None):
    return embcompress.from_pretrained(torch.randn(rows, dim), spec, padding_idx=padding_idx).export()


def forge(path, change_header=None, change_tensors=None, raw_metadata=None):
    """Rewrite the artifact at ``path`` with a changed header or tensors and a VALID digest."""
    header, tensors = read_header(path)
    tensors = dict(tensors)
    if change_tensors:
        change_tensors(tensors)
    fields = {k: v for k, v in header.items()
              if k not in ("sha256", "kind", "format_version", "library_version", "torch_version")}
    if change_header:
        change_header(fields)
    sealed = seal(header["kind"], fields, tensors)
    save_file(tensors, str(path), metadata={"embcompress": raw_metadata or json.dumps(sealed)})
    return path


# -- 1. outputs that destroy things -------------------------------------------------------------
def test_a_fifo_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="device, FIFO or socket"):
        embcompress.save(frozen(), fifo, overwrite=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_a_device_is_refused():
    with pytest.raises(OutputError, match="device, FIFO or socket"):
        embcompress.save(frozen(), "/dev/null", overwrite=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="no procfs")
def test_a_pseudo_file_system_is_named_even_with_overwrite():
    before = Path("/proc/version").read_text()
    with pytest.raises(OutputError, match=r"cannot create a file in /proc .*regular file system"):
        embcompress.save(frozen(), "/proc/version", overwrite=True)
    assert Path("/proc/version").read_text() == before


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        embcompress.save(frozen(), tmp_path, overwrite=True)


def test_a_symlink_is_neither_replaced_nor_written_through(tmp_path):
    target = embcompress.save(frozen(), tmp_path / "real.emb")
    before = target.read_bytes()
    link = tmp_path / "latest.emb"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link.*write to its target"):
        embcompress.save(frozen("hash:buckets=8"), link, overwrite=True)
    assert link.is_symlink() and target.read_bytes() == before
    dangling = tmp_path / "dangling.emb"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        embcompress.save(frozen(), dangling)
    assert not (tmp_path / "nowhere").exists()


def test_an_existing_artifact_needs_overwrite(tmp_path):
    path = embcompress.save(frozen(), tmp_path / "t.emb")
    before = path.read_bytes()
    with pytest.raises(OutputError, match="exists; pass overwrite=True"):
        embcompress.save(frozen("hash:buckets=8"), path)
    assert path.read_bytes() == before
    embcompress.save(frozen("hash:buckets=8"), path, overwrite=True)
    assert embcompress.load(path).hash.buckets == 8


def test_the_command_line_never_writes_over_its_input(tmp_path, capsys):
    source = tmp_path / "table.npy"
    np.save(source, np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32))
    before = source.read_bytes()
    args = ["compress", str(source), "--spec", "scalar:bits=8", "--no-eval", "-o"]
    assert main([*args, str(source), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    os.link(source, tmp_path / "same.emb")  # another name, the same inode
    assert main([*args, str(tmp_path / "same.emb"), "--force"]) == 2
    assert source.read_bytes() == before
    out = tmp_path / "t.emb"
    assert main([*args, str(out)]) == 0
    assert main([*args, str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, str(out), "--force"]) == 0


def test_the_command_line_never_writes_over_a_model_folders_files(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"embeddings.word_embeddings.weight": torch.randn(30, 8)}, str(folder / "model.safetensors"))
    (folder / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(30)))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in before:
        args = ["compress", str(folder), "--spec", "scalar:bits=8", "--no-eval", "-o", str(folder / name), "--force"]
        assert main(args) == 2
        assert "is the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_long_legal_name_stays_legal(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    path = tmp_path / ("x" * (name_max - 4) + ".emb")
    embcompress.save(frozen(), path)
    assert embcompress.load(path).num_embeddings == 10 and len(list(tmp_path.iterdir())) == 1


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    script = f"""
import time, embcompress, embcompress.io as eio
write = eio.save_file
def slow(tensors, path, metadata=None):
    write(tensors, path, metadata=metadata)
    print("writing", flush=True)
    time.sleep(60)
eio.save_file = slow
embcompress.save(embcompress.build("hash:buckets=4", 10, 4), {str(tmp_path / "out.emb")!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(SRC), "EMBCOMPRESS_QUIET": "1", "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p.name.startswith(".ec") for p in tmp_path.iterdir()] == [True]  # the temp file exists now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # still dies of the signal, as by default
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.iterdir()) == []


def pretrained_model():
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4))
    embcompress.compress_(model, "scalar:bits=8")
    return model


def test_a_failed_folder_save_leaves_the_previous_pair_and_no_orphan(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    embcompress.save_pretrained(pretrained_model(), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*_args, **_kwargs):  # the tensors were written; the JSON pointing at them fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        embcompress.save_pretrained(pretrained_model(), folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_sigterm_between_a_folders_two_writes_leaves_nothing(tmp_path):
    script = f"""
import time, pathlib, torch, embcompress
def slow(self, *args, **kwargs):
    print("between", flush=True)
    time.sleep(60)
pathlib.Path.write_text = slow
model = torch.nn.Sequential(torch.nn.Embedding(20, 4))
embcompress.compress_(model, "scalar:bits=8")
embcompress.save_pretrained(model, {str(tmp_path / "m")!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(SRC), "EMBCOMPRESS_QUIET": "1", "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout.readline().strip() == "between"
        assert any(p.name.startswith("tables-") for p in (tmp_path / "m").iterdir())  # the tensors are written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_never_written(tmp_path, bad):
    table = frozen("scalar:bits=8")
    table.scale[3] = bad
    with pytest.raises(ValueError, match="refusing to write.*'scale' holds 1 NaN or infinite"):
        embcompress.save(table, tmp_path / "t.emb")
    trainable = embcompress.from_pretrained(torch.randn(10, 4), "lowrank:rank=2")
    with torch.no_grad():
        next(trainable.parameters())[0, 0] = bad
    with pytest.raises(ValueError, match="refusing to write"):
        embcompress.save(trainable, tmp_path / "t.emb")
    assert list(tmp_path.iterdir()) == []


# -- 2. headers: authenticated, then every field checked ------------------------------------------
def flip_in_file(path, old: bytes, new: bytes):
    raw = path.read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    path.write_bytes(raw.replace(old, new))


def test_a_resealed_file_with_nan_is_refused_at_load(tmp_path):
    path = tmp_path / "t.emb"
    embcompress.save(frozen("scalar:bits=8"), path)
    forge(path, change_tensors=lambda t: t.update(scale=t["scale"].clone().index_fill_(0, torch.tensor([3]),
                                                                                       float("nan"))))
    with pytest.raises(ArtifactError, match="'scale' holds 1 NaN or infinite values, which embcompress never writes"):
        embcompress.load(path)


def test_one_flipped_byte_in_padding_idx_is_refused(tmp_path):
    path = embcompress.save(frozen("scalar:bits=8", padding_idx=1), tmp_path / "t.emb")
    flip_in_file(path, b'padding_idx\\": 1', b'padding_idx\\": 2')
    with pytest.raises(ArtifactError, match="header or tensor checksum mismatch"):
        embcompress.load(path)


def test_one_flipped_byte_in_the_spec_is_refused(tmp_path):
    path = embcompress.save(frozen("scalar:bits=8"), tmp_path / "t.emb")
    flip_in_file(path, b"scalar:bits=8", b"scalar:bits=4")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        embcompress.load(path)
    with pytest.raises(ArtifactError, match="checksum mismatch"):  # inspect refuses what load refuses
        read_header(path)


HOSTILE_HEADERS = {
    "float padding_idx": ("scalar:bits=8", lambda h: h.update(padding_idx=1.0), "padding_idx must be an integer"),
    "padding_idx out of range": ("scalar:bits=8", lambda h: h.update(padding_idx=10), "padding_idx=10 is out of range"),
    "bool padding_idx": ("scalar:bits=8", lambda h: h.update(padding_idx=True), "padding_idx must be an integer"),
    "float bits": ("scalar:bits=8", lambda h: h["metadata"].update(bits=8.0), "bits=8.0 is not one of"),
    "float bucket count": ("hash:buckets=4", lambda h: h["metadata"]["hash"].update(buckets=4.0),
                           "buckets must be an integer"),
    "string hash multiplier": ("memcom:buckets=4,hash=universal", lambda h: h["metadata"]["hash"].update(a="7"),
                               "a must be an integer"),
    "absurd row count": ("hash:buckets=4", lambda h: h.update(num_embeddings=10 ** 15),
                         "num_embeddings=.* out of range"),
    "absurd tt factor": ("tt:cores=2,rank=2", lambda h: h["metadata"].update(vocab_shape=[10 ** 13, 2]),
                         "vocab_shape=.* out of range"),
    "float tt factor": ("tt:cores=2,rank=2", lambda h: h["metadata"].update(vocab_shape=[2.5, 5]),
                        "vocab_shape must be an integer"),
    "unknown metadata": ("qr:buckets=4", lambda h: h["metadata"].update(extra=1), "exactly 'combine'"),
    "metadata a list": ("qr:buckets=4", lambda h: h.update(metadata=[1]), "metadata must be a JSON object"),
    "nested metadata": ("factors", lambda h: h["metadata"].update(activation=[[["relu"]]]),
                        "activation=.* is not one of"),
    "unknown format": ("scalar:bits=8", lambda h: h.update(format="pickle"), "unknown artifact format"),
    "header sizes disagree": ("scalar:bits=8", lambda h: h.update(num_bytes=1), "header says 1 bytes"),
    "fit a list": ("scalar:bits=8", lambda h: h.update(fit=[1]), "fit must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_header_fields_are_refused_before_building(tmp_path, case):
    spec, change, message = HOSTILE_HEADERS[case]
    if spec == "factors":
        spec = "distilled:rank=2"
    path = embcompress.save(frozen(spec), tmp_path / "t.emb")
    forge(path, change_header=change)
    with pytest.raises(ArtifactError, match=message) as info:
        embcompress.load(path)
    assert "\n" not in str(info.value)


def test_zero_ranks_are_refused(tmp_path):
    path = embcompress.save(frozen("distilled:rank=2"), tmp_path / "f.emb")
    forge(path, change_tensors=lambda t: t.update(codes=torch.zeros(10, 0), basis=torch.zeros(0, 4)))
    with pytest.raises(ArtifactError, match="rank >= 1"):
        embcompress.load(path)
    path = embcompress.save(frozen("tt:cores=2,rank=2", rows=12, dim=4), tmp_path / "t.emb")
    header, _ = read_header(path)
    v, d = header["metadata"]["vocab_shape"], header["metadata"]["dim_shape"]
    zero = {"core0": torch.zeros(1, v[0], d[0], 0), "core1": torch.zeros(0, v[1], d[1], 1)}
    forge(path, change_tensors=lambda t: t.update(zero))
    with pytest.raises(ArtifactError, match="ranks must be >= 1"):
        embcompress.load(path)


@pytest.mark.parametrize("metadata, message", [
    ("[1, 2, 3]", "must be a JSON object, got a list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": ' * 5000 + "1" + "}" * 5000, "nested too deeply"),
    ("{not json", "not valid JSON"),
    ('{"format_version": 2, "n": ' + "9" * 5000 + "}", "not valid JSON"),
])
def test_hostile_header_json_is_refused(tmp_path, metadata, message):
    path = embcompress.save(frozen(), tmp_path / "t.emb")
    forge(path, raw_metadata=metadata)
    with pytest.raises(ArtifactError, match=message):
        embcompress.load(path)


def test_pretrained_and_checkpoint_fields_are_checked(tmp_path):
    from fixtures.make_fixtures import FixtureModel

    model = FixtureModel()
    embcompress.compress_(model, "scalar:bits=8")
    folder = embcompress.save_pretrained(model, tmp_path / "m")
    config = folder / "embcompress.json"
    header = json.loads(config.read_text())
    fields = {k: v for k, v in header.items()
              if k not in ("sha256", "kind", "format_version", "library_version", "torch_version")}
    from safetensors.torch import load_file

    tensors = load_file(folder / header["tensors"])
    for change, message in [(lambda f: f["tables"][0].update(padding_idx=0.0), "padding_idx must be an integer"),
                            (lambda f: f["tables"][0].update(shape=[24.0, 8]), "shape must be an integer"),
                            (lambda f: f.update(tables={"a": 1}), "tables must be a list"),
                            (lambda f: f["tables"][0]["bags"].append({"name": "bag", "mode": "avg",
                                                                      "include_last_offset": False}), "mode=")]:
        forged = json.loads(json.dumps(fields))
        change(forged)
        config.write_text(json.dumps(seal("model", forged, tensors)))
        with pytest.raises(ArtifactError, match=message):
            embcompress.load_pretrained(FixtureModel(), folder)


# -- 3. stored codes that would decode to the wrong codeword --------------------------------------
def codebook_artifact(tmp_path, codewords=5, books=3):
    codes = torch.randint(0, codewords, (16, books))
    table = FrozenCodebook.from_codes(codes, torch.randn(books, codewords, 2), "concat")
    return embcompress.save(table, tmp_path / "c.emb"), codes


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_a_code_at_or_above_k_in_any_slot_is_refused_at_load(tmp_path, slot):
    path, codes = codebook_artifact(tmp_path)
    codes[9, slot] = 7  # fits the 3 bits of K = 5, but there is no codeword 7
    forge(path, change_tensors=lambda t: t.update(packed=pack_codes(codes, 3)))
    for kernels_on in (True, False):
        previous = embcompress.kernels.set_enabled(kernels_on)
        try:
            with pytest.raises(ArtifactError, match=f"stored code 7 at row 9, slot {slot} is not below the 5"):
                embcompress.load(path)
        finally:
            embcompress.kernels.set_enabled(previous)


def test_codes_of_a_power_of_two_k_need_no_check_and_load(tmp_path):
    path, codes = codebook_artifact(tmp_path, codewords=4)
    loaded = embcompress.load(path)
    assert torch.equal(loaded.codes(torch.arange(16)), codes)


def test_packing_codes_beyond_k_is_refused():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 5\)"):
        FrozenCodebook.from_codes(torch.tensor([[5, 0]]), torch.randn(2, 5, 2), "concat")


def test_the_code_check_is_cheap(tmp_path):
    codes = torch.randint(0, 5, (200_000, 8))
    table = FrozenCodebook.from_codes(codes, torch.randn(8, 5, 2), "concat")
    started = time.perf_counter()
    table.check_stored()
    assert time.perf_counter() - started < 5.0  # 1.6M codes: well under a second on one core


@pytest.mark.parametrize("spec, change, message", [
    ("hash:buckets=4", lambda h: h["layout"]["hash"].update(buckets=4.0), "layout holds a float"),
    ("tt:cores=2,rank=2", lambda h: h["layout"].update(vocab_shape=[h["layout"]["vocab_shape"][0] + 0.5, 5]),
     "layout holds a float"),
    ("hash:buckets=4,hash=universal", lambda h: h["layout"]["hash"].update(a=-3), "a=-3 is out of range"),
])
def test_trainable_layouts_are_held_to_the_frozen_rules(tmp_path, spec, change, message):
    path = embcompress.save(embcompress.from_pretrained(torch.randn(10, 4), spec), tmp_path / "t.emb")
    forge(path, change_header=change)
    with pytest.raises(ArtifactError, match=message):
        embcompress.load(path)


def test_trainable_codes_beyond_k_are_refused(tmp_path):
    table = embcompress.from_pretrained(torch.randn(20, 4), "pq:groups=2,codewords=5")
    path = embcompress.save(table, tmp_path / "t.emb")
    assert "codes" in table.state_dict()

    def bad_code(tensors):
        tensors["codes"] = tensors["codes"].clone()
        tensors["codes"][4, 1] = 6
    forge(path, change_tensors=bad_code)
    with pytest.raises(ArtifactError, match=r"codes must lie in \[0, 5\)"):
        embcompress.load(path)


def test_a_forged_row_count_is_refused_before_allocating(tmp_path):
    # 2^39 rows of a scalar table would allocate 16 TB if the module were built before the check.
    path = embcompress.save(embcompress.from_pretrained(torch.randn(10, 4), "scalar:bits=8"), tmp_path / "t.emb")
    forge(path, change_header=lambda h: h.update(num_embeddings=1 << 39))
    with pytest.raises(ArtifactError, match="tensors do not fit a 549755813888 x 4"):
        embcompress.load(path)


def test_a_universal_hash_past_its_id_range_is_refused(tmp_path):
    path = embcompress.save(frozen("memcom:buckets=4,hash=universal"), tmp_path / "t.emb")
    forge(path, change_header=lambda h: h.update(num_embeddings=(1 << 31) + 1),
          change_tensors=lambda t: t.pop("scale"))  # without per-row scalars the row count is free
    with pytest.raises(ArtifactError, match="at most 2\\^31 rows"):
        embcompress.load(path)


def test_inspect_refuses_what_load_refuses(tmp_path, capsys):
    path, codes = codebook_artifact(tmp_path)
    codes[2, 0] = 6
    forge(path, change_tensors=lambda t: t.update(packed=pack_codes(codes, 3)))
    assert main(["inspect", str(path)]) == 2
    assert "stored code 6 at row 2" in capsys.readouterr().err


def test_any_changed_byte_is_refused(tmp_path):
    # A small K = 5 codebook artifact with padding: header, tensor data and safetensors framing alike.
    path = embcompress.save(frozen("codes:books=3,codewords=5", rows=24, dim=8, padding_idx=1), tmp_path / "t.emb")
    raw = path.read_bytes()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(raw), (300,), generator=generator).tolist()
    values = torch.randint(0, 256, (300,), generator=generator).tolist()
    loaded = []
    for position, value in zip(positions, values):
        if raw[position] == value:
            continue
        damaged = bytearray(raw)
        damaged[position] = value
        path.write_bytes(bytes(damaged))
        try:
            embcompress.load(path)
            loaded.append(position)
        except ArtifactError:
            pass
    assert loaded == []
