"""Training fast paths: the straight-through helper, the bag-sum backward and sparse query gradients
give the same numbers as the plain formulas they replace."""

import pytest
import torch
import torch.nn.functional as F

import embcompress
from embcompress.frozen.codebook import decode_codes, straight_through
from embcompress.methods.codes import _gumbel

V, D = 80, 12


@pytest.mark.parametrize("combine,stored,books", [("concat", 3, 3), ("concat", 1, 3), ("sum", 4, 4), ("sum", 1, 4)])
def test_straight_through_has_the_gradients_of_hard_plus_soft_minus_soft_detached(combine, stored, books):
    gen = torch.Generator().manual_seed(0)
    width = D // books if combine == "concat" else D
    codebooks = torch.randn(stored, 5, width, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(30, books, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(30, D, generator=gen, dtype=torch.float64)

    def run(fast: bool) -> tuple[torch.Tensor, ...]:
        probs = logits.softmax(-1)
        codes = probs.argmax(-1)
        hard = decode_codes(codes, codebooks, combine)
        if fast:
            out = straight_through(hard, probs, codebooks, combine)
        else:
            table = codebooks.detach().expand(books, -1, -1)
            if combine == "concat":
                soft = torch.einsum("nbk,bkw->nbw", probs, table).reshape(30, D)
            else:
                soft = torch.einsum("nbk,bkw->nw", probs, table)
            out = hard + (soft - soft.detach())
        return (out, *torch.autograd.grad(out, (logits, codebooks), upstream))

    fast, plain = run(True), run(False)
    assert torch.equal(fast[0], plain[0].detach()) or torch.allclose(fast[0], plain[0])
    for got, want in zip(fast[1:], plain[1:]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("stored", [4, 1])
def test_bag_sum_backward_equals_embedding_bag(stored):
    gen = torch.Generator().manual_seed(1)
    codebooks = torch.randn(stored, 8, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 8, (50, 4), generator=gen)
    upstream = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    out = decode_codes(codes, codebooks, "sum")
    (fast,) = torch.autograd.grad(out, codebooks, upstream)
    index = codes + (torch.arange(4) * 8 if stored == 4 else 0)
    plain = F.embedding_bag(index, codebooks.reshape(-1, 6), mode="sum")
    (want,) = torch.autograd.grad(plain, codebooks, upstream)
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(fast, want)


def test_codes_learning_forward_draws_the_papers_gumbel_sample():
    table = embcompress.build("codes:books=3,codewords=4,anneal_rate=0", V, D).train()
    ids = torch.arange(0, V, 3)
    torch.manual_seed(5)
    out = table(ids)
    grads = torch.autograd.grad(out.pow(2).sum(), (table.query, table.codebooks))
    # The formulation this replaces: softmax((log_alpha + gumbel) / tau), one_hot - soft.detach() + soft.
    torch.manual_seed(5)
    log_alpha = table.log_alpha(table.query[ids])
    soft = F.softmax((log_alpha + _gumbel(log_alpha.shape)) / table.temperature(), -1)
    one_hot = F.one_hot(soft.argmax(-1), 4).to(soft)
    want = torch.einsum("nmk,mkd->nd", one_hot - soft.detach() + soft, table.codebooks)
    want_grads = torch.autograd.grad(want.pow(2).sum(), (table.query, table.codebooks))
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("spec", ["dpq:variant=sx,groups=3,codewords=4", "dpq:variant=vq,groups=3,codewords=4",
                                  "codes:books=3,codewords=4"])
def test_sparse_query_gradient_equals_the_dense_one(spec):
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        table = embcompress.build(f"{spec},sparse={str(sparse).lower()}", V, D).train()
        ids = torch.tensor([[1, 5, 5, 7], [2, 9, 1, 30]])
        torch.manual_seed(1)  # the same Gumbel draws for codes
        loss = table(ids).pow(2).sum() + embcompress.aux_loss(table)
        loss.backward()
        grads[sparse] = table.query.grad
    assert not grads[False].is_sparse and grads[True].is_sparse
    torch.testing.assert_close(grads[True].to_dense(), grads[False])


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad])
@pytest.mark.parametrize("spec", ["dpq:variant=sx,groups=3,codewords=4,sparse=true",
                                  "codes:books=3,codewords=4,sparse=true"])
def test_sparse_tables_train_with_optimizers_that_take_sparse_gradients(spec, optimizer):
    torch.manual_seed(0)
    table = embcompress.build(spec, V, D).train()
    opt = optimizer(table.parameters(), lr=0.1)
    ids = torch.randint(0, V, (8, 4))
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[ids.unique()] = False
    before = table.query.detach().clone()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        table(ids).pow(2).mean().backward()
        opt.step()
    assert torch.equal(table.query[untouched], before[untouched])  # only looked-up rows move
    assert not torch.equal(table.query[~untouched], before[~untouched])


def test_sparse_query_with_sparse_adam_for_the_query_and_adam_for_the_rest():
    table = embcompress.build("dpq:variant=sx,groups=3,codewords=4,sparse=true", V, D).train()
    dense = [p for p in table.parameters() if p is not table.query]
    optimizers = [torch.optim.SparseAdam([table.query], lr=0.01), torch.optim.Adam(dense, lr=0.01)]
    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        table(torch.randint(0, V, (16,))).pow(2).mean().backward()
        for opt in optimizers:
            opt.step()
    assert torch.isfinite(table.query).all()
