"""Exported modules under graph capture: torch.jit.trace (TorchScript), torch.export, and ONNX
(run in onnxruntime; the optional `onnx` extra). Traced graphs are checked on ids of another shape."""

import io
import warnings

import pytest
import torch

import embcompress
from method_cases import CASES

V, D = 97, 24
SPECS = [spec for name in embcompress.list_methods() for spec, _ in CASES.get(name, [])]


def frozen(spec, padding_idx=None):
    torch.manual_seed(0)
    return embcompress.build(spec, V, D, padding_idx=padding_idx).export().eval()


def example_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (4, 7), generator=g), torch.randint(0, V, (3, 5), generator=g)


@pytest.mark.parametrize("spec", SPECS)
def test_torchscript_trace(spec):
    module = frozen(spec, padding_idx=3)
    ids, other = example_ids()
    other[0, 0] = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, ids, check_trace=False)
    torch.testing.assert_close(traced(other), module(other))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(other), module(other))


@pytest.mark.parametrize("spec", SPECS)
def test_torch_export(spec):
    module = frozen(spec)
    ids, _ = example_ids()
    program = torch.export.export(module, (ids,))
    torch.testing.assert_close(program.module()(ids), module(ids))


@pytest.mark.parametrize("spec", SPECS)
def test_onnx_matches_onnxruntime(spec):
    pytest.importorskip("onnx", reason="ONNX export needs the optional extra: pip install 'embcompress[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'embcompress[onnx]'")
    module = frozen(spec, padding_idx=3)
    ids, other = example_ids()
    other[1, 2] = 3
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids,), buffer, dynamo=False, input_names=["ids"], output_names=["rows"],
                          dynamic_axes={"ids": {0: "batch", 1: "length"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (rows,) = session.run(None, {"ids": other.numpy()})
    torch.testing.assert_close(torch.from_numpy(rows), module(other), rtol=1e-5, atol=1e-5)
