"""Compressed tables as TorchRec modules (embcompress.integrations.torchrec).

- the collections return what EmbeddingBagCollection / EmbeddingCollection return, decoded by the
  methods' own code (equal to the exported artifacts), inside torchrec's own DLRM;
- bad input names the table;
- agreement: a DLRM with dpq (two), memcom and tt tables trained a few steps sharded by DMP in 2 gloo
  processes (query tables row- and column-wise, MEmCom scalars table-wise, the rest data-parallel) gives the
  losses and final tables of 1 process on the global batch, and both export the same artifacts; the same for
  a model on a CompressedEmbeddingCollection whose head reads the unpooled rows.
"""

import datetime
import os
import subprocess
import sys
import tempfile

import pytest
import torch

torchrec = pytest.importorskip("torchrec", reason="TorchRec is not installed (requirements/torchrec.txt)")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.models.dlrm import DLRM  # noqa: E402

import embcompress  # noqa: E402
from embcompress.config import SpecError  # noqa: E402
from embcompress.integrations.torchrec import (CompressedEmbeddingBagCollection,  # noqa: E402
                                               CompressedEmbeddingCollection, compressed_tables)
from test_ddp import exit_after, free_port, run_processes  # noqa: E402

D, DENSE, BATCH, STEPS, LR = 8, 4, 16, 3, 0.1
ROWS = {"item": 300, "user": 200, "cat": 100, "page": 260}
SPECS = {"item": "dpq:groups=2,codewords=8,batchnorm=false", "user": "memcom:buckets=16,bias=true",
         "cat": "tt:cores=2,rank=4", "page": "dpq:groups=2,codewords=4,batchnorm=false"}
# VQ codes compare the query with the values: rescaling scales the TorchRec-held query too.
JAGGED_SPECS = {**SPECS, "page": "dpq:variant=vq,groups=2,codewords=4,batchnorm=false"}


def bag_tables(rows=ROWS, dim=D):
    return [EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=v, feature_names=[f"f_{name}"])
            for name, v in rows.items()]


def make_kjt(ids_per_sample):
    """{feature: list of per-sample id lists} -> KeyedJaggedTensor."""
    keys = list(ids_per_sample)
    lengths = [len(sample) for key in keys for sample in ids_per_sample[key]]
    values = [i for key in keys for sample in ids_per_sample[key] for i in sample]
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.long),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def batch_data(step, samples):
    """A fixed global batch: dense features, a KJT (1-3 ids per bag, repeats included) and labels."""
    g = torch.Generator().manual_seed(100 + step)
    ids = {f"f_{name}": [torch.randint(0, v, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
                         for _ in range(BATCH)] for name, v in ROWS.items()}
    dense = torch.randn(BATCH, DENSE, generator=g)
    labels = torch.randint(0, 2, (BATCH,), generator=g).float()
    return dense[samples], make_kjt({k: v[samples] for k, v in ids.items()}), labels[samples]


def test_the_core_never_imports_torchrec():
    code = "import sys, embcompress, embcompress.cli; print('torchrec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bag_collection_matches_exported_tables():
    ebc = CompressedEmbeddingBagCollection(bag_tables(), SPECS)
    _, kjt, _ = batch_data(0, slice(0, BATCH))
    ebc(kjt).values().sum().backward()  # gradients reach the TorchRec tables and the small parts
    assert all(p.grad is not None for p in ebc.parameters())
    ebc.eval()
    pooled = ebc(kjt).to_dict()
    frozen = {name: table.export() for name, table in compressed_tables(ebc).items()}
    for name in ROWS:
        jagged = kjt[f"f_{name}"]
        expected = torch.stack([frozen[name](bag).sum(0) for bag in jagged.values().split(jagged.lengths().tolist())])
        torch.testing.assert_close(pooled[f"f_{name}"], expected, rtol=1e-5, atol=1e-5)


def test_small_tables_keep_their_per_row_part_as_a_plain_parameter():
    ebc = CompressedEmbeddingBagCollection(bag_tables(), SPECS, min_sharded_rows=250).eval()
    assert ebc._row_tables == ["item", "page"]  # 300, 260 rows: sharded; the 200-row memcom keeps its scale
    assert type(ebc.tables["user"]) is embcompress.get_method("memcom")
    _, kjt, _ = batch_data(2, slice(0, BATCH))
    frozen = compressed_tables(ebc)["user"].export()
    jagged = kjt["f_user"]
    expected = torch.stack([frozen(bag).sum(0) for bag in jagged.values().split(jagged.lengths().tolist())])
    torch.testing.assert_close(ebc(kjt).to_dict()["f_user"], expected)


def test_embedding_collection_returns_jagged_rows_and_mean_pooling():
    ec = CompressedEmbeddingCollection(embedding_tables(), SPECS).eval()
    _, kjt, _ = batch_data(1, slice(0, BATCH))
    out = ec(kjt)
    tables = compressed_tables(ec)
    for name in ROWS:
        jagged = out[f"f_{name}"]
        assert torch.equal(jagged.lengths(), kjt[f"f_{name}"].lengths())
        torch.testing.assert_close(jagged.values(), tables[name](kjt[f"f_{name}"].values()))
    mean_tables = bag_tables()
    for config in mean_tables:
        config.pooling = torchrec.PoolingType.MEAN
    ebc = CompressedEmbeddingBagCollection(mean_tables, SPECS).eval()
    ebc.load_state_dict(CompressedEmbeddingBagCollection(bag_tables(), SPECS).state_dict())
    summed = CompressedEmbeddingBagCollection(bag_tables(), SPECS).eval()
    summed.load_state_dict(ebc.state_dict())
    lengths = kjt["f_item"].lengths().unsqueeze(1).float()
    torch.testing.assert_close(ebc(kjt).to_dict()["f_item"] * lengths, summed(kjt).to_dict()["f_item"])


def test_rescale_output_scales_the_rows_torchrec_holds():
    ec = CompressedEmbeddingCollection(embedding_tables(), JAGGED_SPECS).eval()
    for name in ("user", "page"):  # memcom's scale and bias, VQ's query: per-row parts TorchRec holds
        with pytest.raises(RuntimeError, match=r"lives in TorchRec; call rescale_output_\(table_name"):
            ec.tables[name].rescale_output_(4.0)
    with pytest.raises(KeyError, match="no table 'items'"):
        ec.rescale_output_("items", 4.0)
    before = {name: table.materialize() for name, table in compressed_tables(ec).items()}
    for name in ROWS:
        ec.rescale_output_(name, 4.0)
    after = compressed_tables(ec)
    _, kjt, _ = batch_data(0, slice(0, BATCH))
    out = ec(kjt)
    for name in ROWS:
        torch.testing.assert_close(after[name].materialize(), 4.0 * before[name], msg=f"table {name}")
        torch.testing.assert_close(out[f"f_{name}"].values(), 4.0 * before[name][kjt[f"f_{name}"].values()])


def test_errors_name_the_table():
    with pytest.raises(SpecError, match="table 'item'.*groups"):
        CompressedEmbeddingBagCollection(bag_tables(), {**SPECS, "item": "dpq:groups=3"})
    with pytest.raises(SpecError, match="table 'cat' has no spec"):
        CompressedEmbeddingBagCollection(bag_tables(), {"item": SPECS["item"], "user": SPECS["user"]})
    with pytest.raises(SpecError, match="do not exist"):
        CompressedEmbeddingBagCollection(bag_tables(), {**SPECS, "itemz": "tt"})
    with pytest.raises(ValueError, match="table 'items'"):
        CompressedEmbeddingBagCollection(bag_tables({"items": 10}), {"default": "tt"})
    ebc = CompressedEmbeddingBagCollection(bag_tables(), SPECS)
    with pytest.raises(KeyError, match="table 'cat'.*f_cat"):
        ebc(make_kjt({"f_item": [[1]], "f_user": [[2]]}))
    with pytest.raises(IndexError, match="table 'user'"):
        ebc(make_kjt({"f_item": [[1]], "f_user": [[200]], "f_cat": [[0]]}))


def test_ranks_with_different_tables_are_named():
    from embcompress.integrations.torchrec.sharding import first_difference

    mine = {"sparse": CompressedEmbeddingBagCollection(bag_tables(), SPECS).describe()}
    other = CompressedEmbeddingBagCollection(bag_tables(), {**SPECS, "user": "memcom:buckets=8"})
    theirs = {"sparse": other.describe()}
    assert first_difference(mine, mine) == ""
    assert "table 'user'" in first_difference(mine, theirs) and "buckets=8" in first_difference(mine, theirs)


def dlrm(ebc):
    return DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[8, D],
                over_arch_layer_sizes=[8, 1])


def embedding_tables():
    return [EmbeddingConfig(name=n, embedding_dim=D, num_embeddings=v, feature_names=[f"f_{n}"])
            for n, v in ROWS.items()]


class JaggedModel(torch.nn.Module):
    """A CompressedEmbeddingCollection under a head that reads every looked-up row (a per-row nonlinearity
    before pooling, so the unpooled rows matter), with the dense features."""

    def __init__(self):
        super().__init__()
        self.sparse = CompressedEmbeddingCollection(embedding_tables(), JAGGED_SPECS)
        self.over = torch.nn.Linear(DENSE + D * len(ROWS), 1)

    def forward(self, dense, features):
        pooled = []
        for name, jagged in self.sparse(features).items():
            samples = torch.repeat_interleave(torch.arange(dense.shape[0]), jagged.lengths().long())
            pooled.append(dense.new_zeros(dense.shape[0], D).index_add_(0, samples, torch.tanh(jagged.values())))
        return self.over(torch.cat([dense, *pooled], dim=1))


def build_model(kind):
    return dlrm(CompressedEmbeddingBagCollection(bag_tables(), SPECS)) if kind == "bag" else JaggedModel()


def worker(rank, world, port, out_dir, kind="bag"):
    """Train the model (``kind``: "bag" = DLRM on the bag collection, "jagged" = JaggedModel) sharded over
    ``world`` gloo processes; rank 0 writes losses, tables and artifacts."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from embcompress.integrations.torchrec import sharding_plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = build_model(kind)
        rows = [p for name, p in model.named_parameters() if ".rows." in name]
        apply_optimizer_in_backward(torch.optim.SGD, rows, {"lr": LR})
        # Query tables row- and column-wise (the planner would keep small tables whole), the scalars
        # table-wise: every sharding offered to per-row parts runs in the test.
        pins = {"item": ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"]),
                "page": ParameterConstraints(sharding_types=["column_wise"], compute_kernels=["fused"],
                                             min_partition=4),
                "user": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])}
        plan = sharding_plan(model, ddr_cap=1 << 30, constraints=pins)
        model = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                      lambda params: torch.optim.SGD(params, lr=LR))
        local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        losses = []
        for step in range(STEPS):
            features, kjt, labels = batch_data(step, local)
            dense.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(features, kjt).squeeze(1), labels)
            loss.backward()
            dense.step()
            losses.append(loss.detach())
        losses = torch.stack(losses)
        dist.all_reduce(losses)  # the mean of the ranks' half-batch means is the global-batch mean
        unscaled = {}
        if kind == "jagged":  # rescaling reaches the rows every rank holds
            unscaled = {f"unscaled_{name}": t.materialize() for name, t in compressed_tables(model).items()}
            collection = next(m for m in model.modules() if isinstance(m, CompressedEmbeddingCollection))
            for name in ROWS:
                collection.rescale_output_(name, 2.0)
        tables = compressed_tables(model)
        if rank == 0:
            save_file({"losses": losses / world, **unscaled, **{name: t.materialize() for name, t in tables.items()}},
                      os.path.join(out_dir, "result.safetensors"))
            for name, table in tables.items():
                embcompress.save(table.export(), os.path.join(out_dir, f"{name}.safetensors"))
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bag", "jagged"])
def test_sharded_training_matches_one_process_and_exports(kind):
    with tempfile.TemporaryDirectory() as single, tempfile.TemporaryDirectory() as sharded:
        ctx = mp.get_context("spawn")
        ports = free_port(), free_port()
        procs = [ctx.Process(target=exit_after, args=(worker, 0, 1, ports[0], single, kind))]
        procs += [ctx.Process(target=exit_after, args=(worker, rank, 2, ports[1], sharded, kind)) for rank in range(2)]
        run_processes(procs, timeout=150, what="TorchRec worker")
        one, two = (load_file(os.path.join(d, "result.safetensors")) for d in (single, sharded))
        torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
        assert one["losses"][-1] != one["losses"][0]  # training moved
        for name in ROWS:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"table {name}")
            if kind == "jagged":
                torch.testing.assert_close(two[name], 2.0 * two[f"unscaled_{name}"], msg=f"rescaled table {name}")
            artifacts = [embcompress.load(os.path.join(d, f"{name}.safetensors")) for d in (single, sharded)]
            assert type(artifacts[0]) is type(artifacts[1])
            torch.testing.assert_close(artifacts[1].materialize(), artifacts[0].materialize(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(artifacts[0].materialize(), one[name], rtol=1e-5, atol=1e-6)


def test_fbgemm_grid_baseline_is_torchrecs_quantized_table():
    """The task grid's torchrec-int* table looks up what TorchRec's quantized EmbeddingBagCollection
    returns for the same fp32 rows, trains straight-through, and counts FBGEMM's row bytes."""
    from benchmarks.perf import build_torchrec_quantized
    from benchmarks.tasks.fbgemm_table import FbgemmRowwiseTable
    from benchmarks.tasks.run import plan

    rows, dim = 300, 50  # d = 50 is padded to whole fp16 words, as FBGEMM needs
    for label, bits, row_bytes in (("torchrec-int8", 8, 64), ("torchrec-int4", 4, 32)):
        table = FbgemmRowwiseTable(rows, dim, bits)
        quantized, stored = build_torchrec_quantized(torch.nn.functional.pad(table.weight.detach(), (0, 6)))[label]
        ids = torch.arange(rows)
        expected = quantized(make_kjt({"f": [[i] for i in range(rows)]})).values()[:, :dim]
        out = table(ids)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert not torch.equal(out, table.weight)  # the lookups are rounded
        out.pow(2).sum().backward()
        torch.testing.assert_close(table.weight.grad, 2 * out.detach())  # straight-through
        assert table.num_bytes() == stored == rows * row_bytes
    cells = plan("quick", ["rec", "topic"], ["hash"], [10.0], [0])
    labels = {cell.choice.label for cell in cells if cell.task == "rec"}
    assert {"torchrec-int8", "torchrec-int4"} <= labels
    assert not any(c.choice.label.startswith("torchrec") for c in plan("quick", ["topic"], ["hash"], [10.0], [0]))
