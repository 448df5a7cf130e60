"""DPQ specifics: straight-through gradients, VQ's auxiliary loss, export of unseen rows, shared codebooks."""

import pytest
import torch

import embcompress
from embcompress import SpecError
from embcompress.budget import config_for_budget
from embcompress.frozen import FrozenCodebook
from embcompress.frozen.codebook import decode_codes
from embcompress.methods.dpq import DPQEmbedding
from helpers import relative_mse, synthetic_table

V, D = 60, 12


def test_sx_straight_through_reaches_keys_query_and_values():
    table = DPQEmbedding(V, D, "dpq:variant=sx,groups=3,codewords=4").train()
    out = table(torch.arange(V))
    (out * torch.randn_like(out)).sum().backward()
    for name in ("query", "keys", "values"):
        grad = getattr(table, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Values get gradient only on chosen codewords (the hard path), as p - stopgrad(p - onehot) gives.
    table = DPQEmbedding(V, D, "dpq:variant=sx,groups=3,codewords=4,batchnorm=false").train()
    out = table(torch.arange(V))
    (out * torch.randn_like(out)).sum().backward()
    codes = table.codes()  # without batch norm, training and eval codes agree
    chosen = torch.zeros(3, 4, dtype=torch.bool)
    chosen[torch.arange(3).expand(V, 3), codes] = True
    assert torch.all(table.values.grad[~chosen] == 0)


def test_sx_training_forward_is_the_hard_choice():
    table = DPQEmbedding(V, D, "dpq:variant=sx,groups=3,codewords=4,batchnorm=false").train()
    ids = torch.arange(V)
    out = table(ids)
    hard = decode_codes(table.codes(ids), table.values, "concat")
    assert torch.equal(out, hard)


def test_vq_gradient_goes_straight_to_query_and_aux_pulls_centroids():
    table = DPQEmbedding(V, D, "dpq:variant=vq,groups=3,codewords=4,batchnorm=false").train()
    assert table.keys is None and table.aux_loss() is None
    out = table(torch.arange(V))
    aux = table.aux_loss()
    codes = table.codes()
    chosen = decode_codes(codes, table.values, "concat")
    torch.testing.assert_close(aux, (chosen - table.query).pow(2).mean())
    out.sum().backward()
    torch.testing.assert_close(table.query.grad, torch.ones(V, D))  # identity straight through
    assert table.values.grad is None  # the task loss does not reach the centroids
    # A few steps on the aux loss alone move the centroids toward their queries.
    optimizer = torch.optim.SGD([table.values], lr=5.0)
    before = aux.item()
    for _ in range(20):
        table(torch.arange(V))
        optimizer.zero_grad()
        table.aux_loss().backward()
        optimizer.step()
    table(torch.arange(V))
    assert table.aux_loss().item() < 0.7 * before
    assert embcompress.aux_loss(torch.nn.Sequential(table)).item() == pytest.approx(table.aux_loss().item())


@pytest.mark.parametrize("spec", ["dpq:variant=sx,groups=4,codewords=8", "dpq:variant=vq,groups=4,codewords=8",
                                  "dpq:variant=sx,groups=4,codewords=8,shared=true"])
def test_export_recomputes_codes_of_rows_never_seen_in_training(spec):
    rows = 200
    table = embcompress.build(spec, rows, D)
    optimizer = torch.optim.Adam(table.parameters(), lr=0.05)
    seen = torch.arange(50)  # only the first quarter of the rows is ever trained
    for _ in range(30):
        out = table(seen[torch.randint(0, 50, (32,))])
        loss = out.pow(2).mean() + embcompress.aux_loss(table)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    table.eval()
    frozen = table.export()
    everything = torch.arange(rows)
    torch.testing.assert_close(frozen(everything), table(everything), rtol=0, atol=0)
    unseen_codes = frozen.codes(torch.arange(50, rows))
    assert (unseen_codes != 0).any(), "rows unseen in training must get their own codes, not code 0"
    assert torch.equal(unseen_codes, table.codes(torch.arange(50, rows)))


def test_batchnorm_running_statistics_decide_eval_codes():
    on = DPQEmbedding(V, D, "dpq:groups=3,codewords=4,batchnorm=true").train()
    off = DPQEmbedding(V, D, "dpq:groups=3,codewords=4,batchnorm=false").train()
    assert {"running_mean", "running_var"} <= set(on.state_dict()) and "running_mean" not in off.state_dict()
    before = on.running_mean.clone()
    on(torch.arange(V))
    assert not torch.equal(on.running_mean, before)  # training updates the statistics
    codes_now = on.codes()
    with torch.no_grad():
        on.running_mean.add_(torch.randn_like(on.running_mean) * 10)
    assert not torch.equal(on.codes(), codes_now)  # eval codes follow the statistics
    # A single id in training has no batch variance: the running statistics are used instead.
    frozen_stats = on.running_mean.clone()
    on(torch.tensor([5]))
    assert torch.equal(on.running_mean, frozen_stats)
    off(torch.arange(V))
    assert off.eval()(torch.arange(V)).shape == (V, D)


def test_shared_artifact_stores_one_codebook():
    per_group = embcompress.build("dpq:groups=4,codewords=16", V, D)
    shared = embcompress.build("dpq:groups=4,codewords=16,shared=true", V, D)
    a, b = per_group.export(), shared.export()
    assert tuple(b.codebooks.shape) == (1, 16, 3) and b.books == 4 and b.metadata()["books"] == 4
    assert a.num_bytes() - b.num_bytes() == (4 - 1) * 16 * 3 * 4
    assert b.num_bytes() == DPQEmbedding.expected_bytes(shared.config, V, D)
    torch.testing.assert_close(b.materialize(), shared.eval().materialize(), rtol=0, atol=0)


def test_shared_codebook_format_round_trips(tmp_path):
    codes = torch.randint(0, 8, (30, 5))
    codebook = torch.randn(1, 8, 2)
    frozen = FrozenCodebook.from_codes(codes, codebook, "concat")
    expected = codebook[0][codes].reshape(30, 10)  # plain indexing: the numpy-style reference decoder
    torch.testing.assert_close(frozen(torch.arange(30)), expected, rtol=0, atol=0)
    loaded = embcompress.load(embcompress.save(frozen, tmp_path / "s.emb"))
    torch.testing.assert_close(loaded(torch.arange(30)), expected, rtol=0, atol=0)
    assert loaded.num_bytes() == frozen.num_bytes() == (30 * 5 * 3 + 7) // 8 + 8 * 2 * 4
    with pytest.raises(ValueError, match="books=5 does not fit codebooks of shape"):
        FrozenCodebook(30, 10, combine="concat", bits=3, packed=frozen.packed, codebooks=torch.randn(2, 8, 2),
                          books=5)


def test_groups_must_divide_the_dim():
    with pytest.raises(SpecError, match=r"groups=5 does not divide embedding_dim=12; valid groups: 1, 2, 3, 4, 6, 12"):
        embcompress.build("dpq:groups=5", V, D)
    with pytest.raises(SpecError, match="groups=5"):
        DPQEmbedding.expected_bytes(embcompress.parse_spec("dpq:groups=5"), V, D)
    with pytest.raises(SpecError, match="tau"):
        embcompress.parse_spec("dpq:tau=0")


@pytest.mark.parametrize("bits_per_row", [24, 64])
def test_budget_picks_a_config_within_bytes(bits_per_row):
    rows, dim = 5000, 48
    config = config_for_budget("dpq:variant=vq,shared=true", rows, dim, bits_per_row=bits_per_row)
    assert config.variant == "vq" and config.shared
    limit = rows * bits_per_row // 8
    size = DPQEmbedding.expected_bytes(config, rows, dim)
    assert size <= limit and size == embcompress.build(config, rows, dim).num_bytes()
    assert size >= 0.8 * limit
    candidates = DPQEmbedding.budget_candidates(rows, dim, config)
    assert all(c.codewords & (c.codewords - 1) == 0 and dim % c.groups == 0 for c in candidates)


@pytest.mark.parametrize("spec", ["dpq:variant=sx,groups=4,codewords=16", "dpq:variant=vq,groups=4,codewords=16",
                                  "dpq:variant=sx,groups=4,codewords=16,batchnorm=false",
                                  "dpq:variant=sx,groups=4,codewords=16,shared=true"])
def test_post_hoc_start_is_kmeans_and_refinement_does_not_hurt(spec):
    weight = synthetic_table(200, D)
    torch.manual_seed(3)
    start = embcompress.from_pretrained(weight, spec, steps=0)
    # The start's eval-mode codes are the nearest centroids of the weight's sub-vectors.
    sub = weight.reshape(200, 4, 3)
    dist = (sub.unsqueeze(2) - start.values.expand(4, -1, -1).unsqueeze(0)).pow(2).sum(-1)
    assert (start.codes() == dist.argmin(-1)).float().mean() > 0.99
    torch.manual_seed(3)
    refined = embcompress.from_pretrained(weight, spec, steps=30)
    start_error = relative_mse(start.export().materialize(), weight)
    assert relative_mse(refined.export().materialize(), weight) <= start_error + 1e-6


def test_fitted_table_keeps_its_codes_when_fine_tuned_and_the_mode_is_saved(tmp_path):
    # Batch statistics would re-rank a fitted table's scores: about half its codes changed at the
    # first training step before the fit froze them (GloVe, 10 x 64).
    weight = synthetic_table(300, D, seed=4)
    torch.manual_seed(0)
    table = embcompress.from_pretrained(weight, "dpq:groups=4,codewords=16", steps=0)
    assert table.layout() == {"batchnorm_stats": "running"}
    eval_rows = table.eval()(torch.arange(300))
    ids = torch.randperm(300)[:64]
    assert torch.equal(table.train()(ids), eval_rows[ids])  # same codes, same rows, in training
    loaded = embcompress.load(embcompress.save(table, tmp_path / "t.emb"))
    assert loaded.layout() == {"batchnorm_stats": "running"}
    fresh = embcompress.build("dpq:groups=4,codewords=16", 300, D)
    assert fresh.layout() == {"batchnorm_stats": "batch"}
    fresh.train()(ids)
    assert fresh.running_mean.abs().sum() > 0  # the paper's training: batch statistics, running ones updated
    with pytest.raises(ValueError, match="batchnorm_stats"):
        fresh.set_batchnorm_stats("frozen")


def test_sx_refuses_one_dim_groups_and_the_budget_never_picks_them():
    # q * k is monotone in q: a 1-dim SX group can only ever pick its largest or smallest key.
    with pytest.raises(SpecError, match="variant=vq"):
        embcompress.build(f"dpq:groups={D},codewords=16", V, D)
    assert embcompress.build(f"dpq:variant=vq,groups={D},codewords=16", V, D).width == 1  # distances are fine
    for ratio in (2, 4, 8):
        config = config_for_budget("dpq", 20_000, 64, ratio=ratio)
        assert 64 // config.groups >= 2, config


def _reference_sx(table, ids):
    """The plain SX forward the fast path replaces: einsum scores, F.batch_norm (which updates the
    running statistics of the copies returned), argmax, hard + soft - soft.detach()."""
    import torch.nn.functional as F

    from embcompress.methods.dpq import BN_EPS, BN_MOMENTUM

    n = ids.shape[0]
    q = F.embedding(ids, table.query).view(n, table.groups, table.width)
    keys = table.keys.expand(table.groups, -1, -1)
    scores = torch.einsum("ndw,dkw->ndk", q, keys)
    stats = None
    if table.config.batchnorm:
        stats = table.running_mean.clone(), table.running_var.clone()
        flat = F.batch_norm(scores.reshape(n, -1), stats[0].view(-1), stats[1].view(-1),
                            training=table.training and n > 1, momentum=BN_MOMENTUM, eps=BN_EPS)
        scores = flat.view_as(scores)
    hard = decode_codes(scores.argmax(-1), table.values, "concat")
    probs = torch.softmax(scores / table.config.tau, -1)
    soft = torch.einsum("ndk,dkw->ndw", probs, table.values.detach().expand(table.groups, -1, -1)).reshape(n, -1)
    return hard + soft - soft.detach(), stats


@pytest.mark.parametrize("spec", ["dpq:groups=4,codewords=8", "dpq:groups=4,codewords=8,tau=0.5",
                                  "dpq:groups=4,codewords=8,shared=true", "dpq:groups=4,codewords=8,batchnorm=false",
                                  "dpq:groups=2,codewords=300"])
@pytest.mark.parametrize("block_floats", [None, 100])
@pytest.mark.parametrize("repeats", [False, True])
def test_sx_fast_path_equals_batch_norm_softmax_reference(spec, block_floats, repeats, monkeypatch):
    from embcompress.methods import dpq

    if block_floats is not None:
        monkeypatch.setattr(dpq, "BLOCK_FLOATS", block_floats)  # several score blocks
    torch.manual_seed(0)
    table = DPQEmbedding(3000, 16, spec).double().train()
    ids = torch.randint(0, 1000, (1500,)) if repeats else torch.randperm(3000)[:1500]
    upstream = torch.randn(1500, 16, dtype=torch.float64)
    params = [table.query, table.keys, table.values]
    # The reference dedupes: scores and batch statistics once per distinct row.
    unique, inverse = torch.unique(ids, return_inverse=True)
    want, stats = _reference_sx(table, unique)
    want = want[inverse]
    want_grads = torch.autograd.grad(want, params, upstream)
    got = table(ids)
    got_grads = torch.autograd.grad(got, params, upstream)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    if stats is not None:  # the running statistics moved as F.batch_norm moves them
        torch.testing.assert_close(table.running_mean, stats[0])
        torch.testing.assert_close(table.running_var, stats[1])
    table.eval()
    want_eval, _ = _reference_sx(table, ids)
    torch.testing.assert_close(table(ids), want_eval)
    torch.testing.assert_close(decode_codes(table.codes(ids), table.values, "concat"), want_eval)
    table.train()
    with torch.no_grad():  # training mode without autograd: the hard rows
        torch.testing.assert_close(table(ids), _reference_sx(table, unique)[0][inverse])


def test_sx_codes_take_the_first_maximum_on_ties():
    from embcompress.methods.dpq import _sx_codes

    qt = torch.ones(2, 3, 5)  # (D, w, N)
    keys = torch.zeros(2, 4, 3)
    keys[:, 1] = keys[:, 3] = 1.0  # codewords 1 and 3 tie for every row
    codes, _ = _sx_codes(qt, keys, torch.zeros(2, 4))
    assert torch.equal(codes, torch.ones(5, 2, dtype=torch.long))
