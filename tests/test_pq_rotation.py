"""pq with rotation=pca: rows coded in the table's balanced principal axes (closed-form OPQ)."""

import pytest
import torch

import embcompress
from embcompress import ArtifactError
from embcompress.methods.pq import balanced_pca_rotation
from embcompress.tied_logits import fit_output_aware, metric_relative_error, output_metric

from test_io_safety import forge

PQ = embcompress.get_method("pq")


def correlated_table(rows=600, dim=24, seed=0):
    """Rows whose variance lies in a few directions that cut across every group of 6 dims."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, 4, generator=g) @ torch.randn(4, dim, generator=g) * 3
    return signal + 0.1 * torch.randn(rows, dim, generator=g)


def relative_error(approx, weight):
    return float((approx - weight).pow(2).sum() / (weight - weight.mean(0)).pow(2).sum())


def test_rotation_decorrelates_the_groups_and_its_bytes_are_counted():
    weight = correlated_table()
    plain, rotated = (PQ.from_pretrained(weight, f"pq:groups=4,codewords=16{extra}", fit="seed=0", progress=False)
                      for extra in ("", ",rotation=pca"))
    frozen = rotated.export()
    assert relative_error(frozen.materialize(), weight) < 0.5 * relative_error(plain.export().materialize(), weight)
    assert frozen.rotation is not None and frozen.rotation.dtype == torch.float16 and frozen.rotation.shape == (24, 24)
    assert frozen.num_bytes() == PQ.expected_bytes(rotated.config, 600, 24) == plain.export().num_bytes() + 2 * 24 * 24
    torch.testing.assert_close(frozen.materialize(), rotated(torch.arange(600)).detach(), rtol=1e-4, atol=1e-4)
    basis = frozen.rotation.float()
    torch.testing.assert_close(basis.t() @ basis, torch.eye(24), rtol=0, atol=5e-3)  # orthonormal up to fp16


def test_axes_are_dealt_so_each_groups_variance_product_is_even():
    # Diagonal variances 2^0 .. 2^7 over 8 dims, 2 groups: the products must match (2^14 each)
    scale = 2.0 ** (torch.arange(8) / 2)
    weight = torch.randn(20000, 8, generator=torch.Generator().manual_seed(1)) * scale
    basis = balanced_pca_rotation(weight, groups=2)
    variances = (weight @ basis).var(0)
    products = variances.log().view(2, 4).sum(1)
    assert abs(float(products[0] - products[1])) < 0.2 and float(products.sum()) == pytest.approx(28 * 0.6931, rel=0.05)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_strongest_axes_go_one_to_a_group_at_any_scale(scale):
    """Variances far below 1 once made every log negative and piled the strongest axes into one group."""
    spread = 2.0 ** -torch.arange(12.0)
    weight = torch.randn(5000, 12, generator=torch.Generator().manual_seed(2)) * spread * scale
    basis = balanced_pca_rotation(weight, groups=3)
    variances = (weight @ basis).var(0).view(3, 4)
    strongest = variances.max(1).values.sort(descending=True).values
    torch.testing.assert_close(strongest, (spread[:3] * scale) ** 2, rtol=0.1, atol=0)
    torch.testing.assert_close(basis.abs(), balanced_pca_rotation(weight / scale, groups=3).abs(), rtol=0, atol=1e-3)


def test_rotated_bags_and_fine_tuning_match_the_decoded_rows():
    weight = correlated_table()
    table = PQ.from_pretrained(weight, "pq:groups=4,codewords=16,rotation=pca", progress=False)
    frozen = table.export()
    rows = frozen.materialize()
    ids = torch.randint(0, 600, (9, 5))
    for mode, pool in (("sum", lambda r: r.sum(1)), ("mean", lambda r: r.mean(1)), ("max", lambda r: r.max(1).values)):
        torch.testing.assert_close(frozen.bag(ids, mode=mode), pool(rows[ids]), rtol=1e-4, atol=1e-4)
    table(ids).pow(2).sum().backward()  # the codebooks train through the fixed basis
    assert table.codebooks.grad is not None and not table.rotation.requires_grad


def test_a_forged_rotation_is_refused(tmp_path):
    path = embcompress.save(PQ.from_pretrained(correlated_table(), "pq:groups=4,codewords=16,rotation=pca",
                                               progress=False).export(), tmp_path / "t.emb")
    assert embcompress.load(path).rotation is not None
    good = path.read_bytes()
    forge(path, change_tensors=lambda t: t.update(rotation=t["rotation"][:12].clone()))
    with pytest.raises(ArtifactError, match=r"rotation must be a float \(24, 24\) matrix"):
        embcompress.load(path)
    path.write_bytes(good)
    forge(path, change_tensors=lambda t: t.update(rotation=t["rotation"].clone().fill_diagonal_(float("nan"))))
    with pytest.raises(ArtifactError, match="'rotation' holds 24 NaN or infinite values"):
        embcompress.load(path)


def test_output_aware_fits_put_the_whole_metric_into_the_basis():
    """The block-diagonal metric of plain pq drops cross-group terms; a rotated basis takes all of it."""
    weight = correlated_table()
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(24, 24, generator=g)
    metric = output_metric(mix @ mix.t() / 24)  # couples every pair of dims
    spec = "pq:groups=4,codewords=16,rotation=pca"
    plain = PQ.from_pretrained(weight, spec, fit="seed=0", progress=False).export().materialize()
    aware = fit_output_aware(weight, spec, metric, fit="seed=0", progress=False)
    assert aware.rotation is not None and aware.num_bytes() == PQ.expected_bytes(embcompress.parse_spec(spec), 600, 24)
    assert metric_relative_error(aware.materialize(), weight, metric) < metric_relative_error(plain, weight, metric)
    with pytest.raises(embcompress.SpecError, match="rotation='random' is not one of none, pca"):
        embcompress.parse_spec("pq:rotation=random")
