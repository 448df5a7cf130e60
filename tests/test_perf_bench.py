"""benchmarks/perf.py end to end at a toy size: the report's structure, not its timings."""

import json

import torch

from benchmarks import perf


def test_perf_benchmark_writes_ratios_and_memory_facts(tmp_path):
    threads = torch.get_num_threads()
    try:
        perf.main(["--rows", "4096", "--batch", "512", "--rounds", "1", "--train-rounds", "1", "--threads", "1",
                   "--bags", "8", "--bag-length", "4", "--bag-count", "16", "--skip-memory", "--skip-plain",
                   "--methods", "dpq,codes,tt,memcom",
                   "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "perf.json").read_text())
    formats = report["inference"]["formats"]
    assert {"dpq", "pq", "codes", "memcom", "hash", "tt"} <= set(formats)
    assert all(r["ratio"] > 0 for r in formats.values())
    assert formats["tt"]["cache_bytes"] > formats["tt"]["bytes"]  # the cache is reported, not counted
    methods = report["training"]["methods"]
    assert "sparse=true" in methods["dpq"]["spec"] and "sparse=true" in methods["codes"]["spec"]
    # The query tables are V x d parameters, but with sparse=true their gradients hold only looked-up rows.
    for name in ("dpq", "codes"):
        assert methods[name]["dense_vxd"] and not methods[name]["dense_vxd_grad"]
    assert not methods["tt"]["dense_vxd"]  # (memcom's 10,000 buckets outnumber these 4,096 toy rows)
    assert "load_average_start" in report and "env" in report
    assert {"dpq", "hash", "tt"} <= set(report["bags"]["formats"])
    text = (tmp_path / "perf.md").read_text()
    assert "| dpq |" in text and "dense V x d gradient" in text
