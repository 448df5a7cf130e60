"""The contract every registered method meets, parametrized over the registry."""

import pytest
import torch
from torch import nn

import embcompress
from embcompress.config import parse_spec
from helpers import relative_mse, synthetic_table
from method_cases import CASES

REGISTERED = embcompress.list_methods()
SPECS = [spec for name in REGISTERED for spec, _ in CASES.get(name, [])]
QUALITY = [(spec, limit) for name in REGISTERED for spec, limit in CASES.get(name, [])]
V, D = 97, 24
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8]


def test_every_registered_method_has_cases():
    missing = [name for name in REGISTERED if not CASES.get(name)]
    assert not missing, f"add conformance cases for {missing} in tests/method_cases.py"


def make(spec, padding_idx=None, rows=V, dim=D):
    torch.manual_seed(0)
    return embcompress.build(spec, rows, dim, padding_idx=padding_idx)


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trip(spec):
    config = parse_spec(spec)
    assert parse_spec(config.to_spec()) == config
    assert make(spec).spec == config.to_spec()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 0), (2, 1, 3)])
def test_shapes_and_dtypes(spec, dtype, shape):
    table = make(spec)
    ids = torch.randint(0, min(V, 127), shape, dtype=dtype)
    out = table(ids)
    assert out.shape == (*shape, D) and out.dtype == torch.float32
    assert not isinstance(out, tuple)


@pytest.mark.parametrize("spec", SPECS)
def test_dense_equivalence_with_materialize(spec):
    table = make(spec).eval()
    dense = table.materialize()
    assert dense.shape == (V, D)
    ids = torch.randint(0, V, (4, 7))
    torch.testing.assert_close(table(ids), dense[ids])


@pytest.mark.parametrize("spec", SPECS)
def test_padding_row_is_zero_and_gets_no_gradient(spec):
    table = make(spec, padding_idx=3).train()
    ids = torch.tensor([[3, 3, 1], [3, 0, 2]])
    out = table(ids)
    assert torch.all(out[ids == 3] == 0)
    out[ids == 3].sum().backward()
    for name, param in table.named_parameters():
        assert param.grad is None or torch.all(param.grad == 0), name
    assert torch.all(table.eval().materialize()[3] == 0)
    assert torch.all(table.export()(torch.tensor([3])) == 0)


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_reach_every_trainable_parameter(spec):
    table = make(spec).train()
    out = table(torch.arange(V))
    loss = (out * torch.randn_like(out)).sum() + embcompress.aux_loss(table)
    loss.backward()
    for name, param in table.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("spec", SPECS)
def test_export_matches_eval_module(spec):
    table = make(spec)
    table.train()
    table(torch.arange(V))  # a training step may move running statistics
    table.eval()
    frozen = table.export()
    assert not list(frozen.parameters())
    ids = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(frozen(ids), table(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen.materialize(), table.materialize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_byte_count_is_exact(spec, tmp_path):
    frozen = make(spec).export()
    stored = frozen.stored_tensors()
    assert frozen.num_bytes() == sum(t.numel() * t.element_size() for t in stored.values())
    assert make(spec).num_bytes() == frozen.num_bytes()
    table_class = embcompress.get_method(parse_spec(spec).method)
    assert table_class.expected_bytes(parse_spec(spec), V, D) == frozen.num_bytes()
    path = embcompress.save(frozen, tmp_path / "t.emb")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header_len == frozen.num_bytes()  # the file's tensor payload
    assert frozen.compression_ratio() == pytest.approx(V * D * 4 / frozen.num_bytes())


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_round_trips(spec, tmp_path):
    table = make(spec, padding_idx=1).eval()
    ids = torch.randint(0, V, (20,))
    loaded = embcompress.load(embcompress.save(table, tmp_path / "train.emb")).eval()
    assert type(loaded) is type(table) and loaded.spec == table.spec and loaded.padding_idx == 1
    torch.testing.assert_close(loaded(ids), table(ids))
    frozen = table.export()
    loaded_frozen = embcompress.load(embcompress.save(frozen, tmp_path / "frozen.emb"))
    assert type(loaded_frozen) is type(frozen)
    torch.testing.assert_close(loaded_frozen(ids), frozen(ids))
    assert loaded_frozen.num_bytes() == frozen.num_bytes()


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip(spec):
    a, b = make(spec).eval(), embcompress.build(spec, V, D)
    if a.layout():
        b = type(a)(V, D, spec, layout=a.layout())
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.eval().materialize(), a.materialize())


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_under_seed(spec):
    torch.testing.assert_close(make(spec).eval().materialize(), make(spec).eval().materialize())
    weight = synthetic_table(V, D)
    torch.manual_seed(1)
    a = embcompress.from_pretrained(weight, spec, steps=20).eval().materialize()
    torch.manual_seed(1)
    b = embcompress.from_pretrained(weight, spec, steps=20).eval().materialize()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spec,limit", QUALITY)
def test_post_hoc_fit_quality(spec, limit):
    weight = synthetic_table()
    table = embcompress.from_pretrained(weight, spec)
    error = relative_mse(table.eval().materialize(), weight)
    assert error <= limit, f"{spec}: relative MSE {error:.3f} > {limit}"
    torch.testing.assert_close(table.export().materialize(), table.materialize(), rtol=1e-5, atol=1e-5)


class BagClassifier(nn.Module):
    def __init__(self, table, classes):
        super().__init__()
        self.table = table
        self.head = nn.Linear(table.embedding_dim, classes)

    def forward(self, ids):
        return self.head(self.table(ids).mean(1))


@pytest.mark.parametrize("spec", SPECS)
def test_training_lowers_the_loss(spec):
    torch.manual_seed(0)
    rows, classes = 200, 4
    label_of_row = torch.randint(0, classes, (rows,))
    ids = torch.randint(0, rows, (512, 6))
    labels = label_of_row[ids[:, 0]]  # the first token decides the class
    model = BagClassifier(embcompress.build(spec, rows, D), classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)

    def loss_now():
        model.eval()
        with torch.no_grad():
            return nn.functional.cross_entropy(model(ids), labels).item()

    before = loss_now()
    model.train()
    for step in range(150):
        batch = torch.randint(0, len(ids), (64,))
        loss = nn.functional.cross_entropy(model(ids[batch]), labels[batch]) + embcompress.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = loss_now()
    assert after < 0.9 * before, f"{spec}: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("method", REGISTERED)
@pytest.mark.parametrize("ratio", [4.0, 10.0])
def test_budget_chooses_a_config_that_fits(method, ratio):
    from embcompress.budget import config_for_budget

    rows, dim = 2000, 32
    limit = rows * dim * 4 / ratio
    try:
        config = config_for_budget(method, rows, dim, ratio=ratio)
    except embcompress.SpecError as exc:
        pytest.skip(f"{method} cannot reach {ratio}x here: {exc}")
    table = embcompress.build(config, rows, dim)
    assert table.num_bytes() <= limit
    assert table.num_bytes() >= 0.5 * limit, f"{config.to_spec()} wastes the budget"
