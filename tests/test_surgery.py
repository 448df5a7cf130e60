"""Model surgery: compress_, tied heads, decompress_, save_pretrained / load_pretrained."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import embcompress
from embcompress.surgery import CompressedEmbeddingBag, TiedOutput

SRC = Path(__file__).resolve().parents[1] / "src"


class Encoder(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(12, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids):
        pos = torch.arange(ids.shape[-1])
        return torch.tanh(self.mix(self.tok(ids) + self.pos(pos)))


class TinyLM(nn.Module):
    """Nested encoder, a tied LM head, an EmbeddingBag of categorical features, a shared table."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.encoder = Encoder(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.encoder.tok.weight  # tied by identity
        self.features = nn.ModuleDict({"cats": nn.EmbeddingBag(30, dim, mode="mean"),
                                       "users": nn.Embedding(40, dim)})
        self.items = nn.Embedding(40, dim)
        self.items.weight = self.features["users"].weight  # two modules, one table

    def forward(self, ids, cats, offsets, users):
        h = self.encoder(ids) + self.features["cats"](cats, offsets)[:, None] \
            + (self.features["users"](users) * self.items(users))[:, None]
        return self.head(h)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    ids[0, -1] = 0
    cats = torch.randint(0, 30, (8,), generator=g)
    return ids, cats, torch.tensor([0, 3, 5]), torch.randint(0, 40, (3,), generator=g)


def test_one_spec_replaces_every_table_and_keeps_ties():
    torch.manual_seed(0)
    model = TinyLM()
    report = embcompress.compress_(model, "lowrank:rank=4")
    tok = model.encoder.tok
    assert isinstance(tok, embcompress.CompressedEmbedding) and tok.padding_idx == 0
    assert isinstance(model.head, TiedOutput) and model.head.table is tok
    assert model.head.bias is not None
    assert isinstance(model.features["cats"], CompressedEmbeddingBag)
    assert model.features["users"] is model.items  # the shared table stays shared
    assert sorted(report.replaced) == ["encoder.pos", "encoder.tok", "features.cats", "features.users", "items"]
    assert report.bytes_before == 4 * 16 * (50 + 12 + 30 + 40)
    assert report.bytes_after == sum(t.bytes_after for t in report.tables) < report.bytes_before
    assert report.tables[0].tied_heads == ["head"]
    text = str(report)
    assert "encoder.tok" in text and "total" in text and "head" in text
    assert model(*inputs()).shape == (3, 7, 50)


def test_tied_head_logits_follow_table_training():
    torch.manual_seed(0)
    model = TinyLM()
    embcompress.compress_(model, {"encoder.tok": "lowrank:rank=4", "default": "skip"}, fit_options={"steps": 20})
    hidden = torch.randn(5, 16)
    before = model.head(hidden).detach().clone()
    optimizer = torch.optim.SGD(model.encoder.tok.parameters(), lr=0.5)
    model.encoder.tok(torch.arange(50)).pow(2).sum().backward()
    optimizer.step()
    after = model.head(hidden)
    assert not torch.allclose(before, after)
    dense = model.encoder.tok.materialize()
    assert torch.allclose(after, hidden @ dense.t() + model.head.bias, atol=1e-4)


def test_tied_head_without_output_logits_uses_decoded_table():
    torch.manual_seed(0)
    model = TinyLM()
    embcompress.compress_(model, {"encoder.tok": "hash:buckets=20"}, init="random")
    hidden = torch.randn(4, 16, requires_grad=True)
    logits = model.head(hidden)
    assert torch.allclose(logits, hidden @ model.encoder.tok.materialize().t() + model.head.bias, atol=1e-5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.encoder.tok.parameters() if p.requires_grad)


def test_untie_gives_an_independent_copy():
    torch.manual_seed(0)
    model = TinyLM()
    original = model.encoder.tok.weight.detach().clone()
    report = embcompress.compress_(model, {"encoder.tok": "lowrank:rank=4"}, untie=True)
    assert isinstance(model.head, nn.Linear) and torch.equal(model.head.weight, original)
    assert report.tables[0].untied_heads == ["head"]


def test_other_holders_of_the_weight_are_an_error():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.proj = nn.Module()
            self.proj.w = self.emb.weight  # a raw Parameter, not a Linear

    with pytest.raises(ValueError, match="proj.w"):
        embcompress.compress_(Sneaky(), "lowrank:rank=2")


def test_regex_mapping_default_and_skip():
    torch.manual_seed(0)
    model = TinyLM()
    report = embcompress.compress_(model, {r"encoder\..*": "scalar:bits=8", "encoder.pos": "skip",
                                           r"features\.users|items": None, "default": "hash:buckets=8"})
    assert isinstance(model.encoder.pos, nn.Embedding) and isinstance(model.features["users"], nn.Embedding)
    assert model.encoder.tok.config.method == "scalar"
    assert model.features["cats"].table.config.method == "hash"
    assert {n for n, _ in report.skipped} == {"encoder.pos", "features.users", "items"}
    with pytest.warns(UserWarning, match="nomatch"):
        embcompress.compress_(TinyLM(), {"nomatch": "scalar:bits=8"})
    with pytest.raises(embcompress.SpecError, match="share one weight"):
        embcompress.compress_(TinyLM(), {"items": "scalar:bits=8", "default": "hash:buckets=8"})


def test_filter_fn_and_random_init():
    torch.manual_seed(0)
    model = TinyLM()
    report = embcompress.compress_(model, "scalar:bits=8", init="random",
                                   filter_fn=lambda module, name: name.startswith("encoder"))
    assert report.replaced == ["encoder.tok", "encoder.pos"]
    assert isinstance(model.items, nn.Embedding)


def test_embedding_bag_matches_nn_embedding_bag():
    torch.manual_seed(0)
    for mode in ("sum", "mean", "max"):
        bag = nn.EmbeddingBag(30, 8, mode=mode, padding_idx=2)
        holder = nn.Sequential(bag)
        ids = torch.tensor([1, 2, 5, 7, 2, 9, 3])
        offsets = torch.tensor([0, 2, 5])
        weights = torch.rand(7) if mode == "sum" else None
        embcompress.compress_(holder, "scalar:bits=16")
        wrapper = holder[0]
        assert isinstance(wrapper, CompressedEmbeddingBag)
        reference = nn.EmbeddingBag(30, 8, mode=mode, padding_idx=2)
        with torch.no_grad():
            reference.weight.copy_(wrapper.table.materialize())
        expected = reference(ids, offsets, per_sample_weights=weights)
        assert torch.allclose(wrapper(ids, offsets, weights), expected, atol=1e-6)
        two_d = torch.tensor([[1, 4], [2, 6]])
        assert torch.allclose(wrapper(two_d), reference(two_d), atol=1e-6)


def test_decompress_round_trip_restores_modules_and_ties():
    torch.manual_seed(0)
    model = TinyLM()
    embcompress.compress_(model, "lowrank:rank=4")
    model.eval()
    expected = model(*inputs())
    names = embcompress.decompress_(model)
    assert "head" in names and "encoder.tok" in names
    assert type(model.encoder.tok) is nn.Embedding and model.encoder.tok.padding_idx == 0
    assert type(model.head) is nn.Linear and model.head.weight is model.encoder.tok.weight
    assert type(model.features["cats"]) is nn.EmbeddingBag
    assert model.items.weight is model.features["users"].weight
    assert not any(isinstance(m, embcompress.CompressedEmbedding) for m in model.modules())
    assert torch.allclose(model(*inputs()), expected, atol=1e-5)


def test_save_load_pretrained_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    embcompress.compress_(model, {"encoder.tok": "lowrank:rank=4", "features.cats": "pq:groups=4,codewords=8",
                                  "default": "scalar:bits=8"}, fit_options={"steps": 10})
    with torch.no_grad():
        model.head.bias.add_(0.5)  # trained after compression: the saved head bias must win
    model.eval()
    expected = model(*inputs())
    folder = embcompress.save_pretrained(model, tmp_path / "ckpt")
    header = json.loads((folder / "embcompress.json").read_text())
    assert header["tables"][0]["tied_heads"] == [{"name": "head", "bias": True}]
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import embcompress
        from test_surgery import TinyLM, inputs
        torch.manual_seed(0)
        model = TinyLM()  # fresh, uncompressed, same architecture and seed
        report = embcompress.load_pretrained(model, {str(folder)!r})
        assert model.head.table is model.encoder.tok
        model.eval()
        out = model(*inputs())
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert torch.equal(out, expected), (out - expected).abs().max()
        print(report.ratio)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC), "EMBCOMPRESS_QUIET": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) > 1


def test_load_pretrained_detects_damage_and_wrong_models(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    embcompress.compress_(model, {"encoder.tok": "scalar:bits=8"})
    folder = embcompress.save_pretrained(model, tmp_path / "ckpt")
    other = nn.Sequential(nn.Embedding(50, 16))
    with pytest.raises(embcompress.ArtifactError, match="encoder.tok"):
        embcompress.load_pretrained(other, folder)
    tensor_file = next(folder.glob("tables-*.safetensors"))
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(embcompress.ArtifactError, match="checksum"):
        embcompress.load_pretrained(TinyLM(), folder)
    with pytest.raises(ValueError, match="no compressed table"):
        embcompress.save_pretrained(TinyLM(), tmp_path / "empty")


@pytest.mark.parametrize("spec", ["dpq:groups=4,codewords=8", "codes:books=4,codewords=8"])
def test_a_compressed_tables_query_table_is_not_compressed_again(spec):
    # DPQ and codes keep their query rows in an nn.Embedding (for DDP's sparse gradients); a second
    # compress_ over the model must treat it as part of the table, not as another table.
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 2))
    embcompress.compress_(model, spec, init="random")
    table = model[0]
    assert isinstance(table.query_table, nn.Embedding)
    report = embcompress.compress_(model, "lowrank:rank=2", init="random")
    assert model[0] is table and isinstance(table.query_table, nn.Embedding)
    assert not report.tables
    assert set(table.state_dict()) >= {"query"}  # saved under its plain name
