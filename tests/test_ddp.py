"""Compressed tables under DistributedDataParallel: two gloo processes on localhost.

Checks, after a few SGD steps on the same global batch:
- memcom, tt and DPQ without batch norm (dense and sparse query gradients): every parameter
  equals a single-process run's (DDP averages the ranks' gradients of the mean loss over their
  half batches);
- DPQ with batch norm: both ranks hold identical codebooks, queries and running statistics. Its
  batch statistics are per rank, as with ``nn.BatchNorm1d`` under DDP (no SyncBatchNorm inside
  the functional batch norm), and DDP broadcasts rank 0's running statistics at every forward,
  so the ranks never drift apart; that documented approach is what is tested here.
"""

import datetime
import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import embcompress

V, D, BATCH, STEPS = 64, 16, 16, 3
EXACT = ["memcom:buckets=16", "tt:cores=2,rank=4", "dpq:variant=sx,groups=4,codewords=8,batchnorm=false",
         # sparse query gradients: DDP all-reduces them because the query table is an nn.Embedding
         "dpq:variant=sx,groups=4,codewords=8,batchnorm=false,sparse=true"]
BN = "dpq:variant=sx,groups=4,codewords=8"


class Model(nn.Module):
    def __init__(self, specs):
        super().__init__()
        self.tables = nn.ModuleList(embcompress.build(s, V, D) for s in specs)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(sum(t(ids).mean(1) for t in self.tables))


def data():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, V, (STEPS, BATCH, 5), generator=g), torch.randint(0, 3, (STEPS, BATCH), generator=g))


def train(model, ids, labels):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids[step]), labels[step]).backward()
        opt.step()


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ids, labels = data()
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        states = {}
        for name, specs in (("exact", EXACT), ("bn", [BN])):
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(Model(specs))
            train(model, ids[:, half], labels[:, half])
            with torch.no_grad():  # DDP broadcasts rank 0's buffers (running statistics) at each forward
                model.eval()(ids[0, half])
            states[name] = model.module.state_dict()
        torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_after(target, *args) -> None:
    """Run ``target(*args)`` in a spawned worker, then leave without interpreter finalization.

    Threads that gloo, TorchRec or FBGEMM leave behind can abort the finalization (CI once saw a rank
    end by SIGABRT, "terminate called without an active exception", after its process group was
    destroyed), failing a run whose work was done. An exception in ``target`` still fails the worker.
    """
    target(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(procs: list, timeout: float, what: str) -> None:
    """Start ``procs``, wait for each (killed and failed after ``timeout`` s), and require exit code 0."""
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            pytest.fail(f"{what} timed out")
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def run_ddp():
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=exit_after, args=(worker, r, port, out_dir)) for r in range(2)]
        run_processes(procs, timeout=90, what="DDP worker")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.slow
def test_ddp_matches_single_process_and_keeps_dpq_in_sync():
    rank0, rank1 = run_ddp()
    for name in ("exact", "bn"):
        for key in rank0[name]:
            torch.testing.assert_close(rank0[name][key], rank1[name][key], msg=f"ranks disagree on {name} {key}")
    assert rank0["bn"]["tables.0.running_mean"].abs().sum() > 0  # batch norm statistics did move
    torch.manual_seed(0)
    single = Model(EXACT)
    ids, labels = data()
    train(single, ids, labels)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0["exact"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=f"{key}: DDP differs from one process on the global batch")
