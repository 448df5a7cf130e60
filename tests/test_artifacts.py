"""Artifacts: safetensors + JSON, no pickle; bad files get clear errors and writes are atomic."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import embcompress
from embcompress import ArtifactError
from embcompress.bitpack import pack_codes, packed_size, unpack_codes


@pytest.fixture
def artifact(tmp_path):
    table = embcompress.from_pretrained(torch.randn(64, 8), "scalar:bits=4")
    return embcompress.save(table.export(), tmp_path / "t.emb")


def test_truncated_file(artifact):
    raw = artifact.read_bytes()
    artifact.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        embcompress.load(artifact)


def test_tampered_file(artifact):
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


def test_header_records_versions_and_spec(artifact):
    raw = artifact.read_bytes()
    header = json.loads(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["embcompress"])
    assert header["format_version"] == 1 and header["library_version"] == embcompress.__version__
    assert header["kind"] == "frozen" and header["format"] == "scalar"


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
        embcompress.save(embcompress.build("hash:buckets=8", 10, 4), path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


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
