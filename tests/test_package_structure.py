"""Signature rules of CONVENTIONS.md, checked for every public function (in the manner of scanpy's test)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import cellsymphony as cs

SUBPACKAGES = ("io", "pp", "tl", "pl", "datasets")

# every public function of pp / tl is one of three kinds
ANNOTATORS = {
    "pp.embed_morphology",
    "pp.embed_expression",
    "pp.annotate_singler",
    "pp.transfer_nucleus_labels",
    "pp.import_labels",
    "pp.harmonize_labels",
    "tl.niches",
    "pp.normalize_stain",
    "tl.predict_expression",
}
TRAINERS = {"tl.train_classifier", "tl.align_contrastive"}
GETTERS = {
    "pp.cell_patches",
    "tl.cluster_enrichment",
    "tl.compare_classifiers",
    "tl.spatial_coherence",
    "pp.augment_stain",  # returns a new, larger MuData (the section plus its stain-perturbed copies)
}
# functions whose parameter names an issue fixed as a contract (tests outside the package call them)
CONTRACT_FIRST = {"tl.predict_expression": {"target"}}  # issue 18: predict_expression(target, reference, ...)
# readers, writers and data makers take a path or a list first rather than a data object
PATH_FIRST = {"io", "datasets"}


def public_functions():
    for sub in SUBPACKAGES:
        module = getattr(cs, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                yield f"{sub}.{name}", obj


FUNCTIONS = dict(public_functions())


def test_subpackages_exposed():
    for sub in (*SUBPACKAGES, "models"):
        assert hasattr(cs, sub)
    assert isinstance(cs.__version__, str)
    assert cs.__version__


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_positional_parameters(name):
    """Data first, at most two more positional parameters, everything else keyword-only."""
    sig = inspect.signature(FUNCTIONS[name])
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert len(positional) <= 3, f"{name} has {len(positional)} positional parameters: make the rest keyword-only"
    assert not any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()), f"{name} takes *args"
    sub = name.split(".")[0]
    if sub not in PATH_FIRST:
        assert positional, f"{name} must take the data object first"
        first = CONTRACT_FIRST.get(name, {"mdata", "adata", "data"})
        assert positional[0].name in first, f"{name}: first parameter is {positional[0].name!r}"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_docstring_and_annotations(name):
    func = FUNCTIONS[name]
    assert func.__doc__, f"{name} has no docstring"
    assert "Parameters" in func.__doc__, f"{name}'s docstring has no Parameters section"
    assert "Returns" in func.__doc__, f"{name}'s docstring has no Returns section"
    sig = inspect.signature(func)
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}: parameter {p.name} has no type annotation"


@pytest.mark.parametrize("name", sorted(n for n in FUNCTIONS if n.split(".")[0] in {"pp", "tl"}))
def test_function_kinds(name):
    params = inspect.signature(FUNCTIONS[name]).parameters
    assert name in ANNOTATORS | TRAINERS | GETTERS, f"{name}: add it to ANNOTATORS, TRAINERS or GETTERS"
    if name in ANNOTATORS:
        assert "key_added" in params, f"annotator {name} needs key_added"
        assert "copy" in params, f"annotator {name} needs copy"
        assert params["copy"].kind == params["copy"].KEYWORD_ONLY
        ret = str(inspect.signature(FUNCTIONS[name]).return_annotation)
        assert ret.endswith("None"), f"annotator {name} returns None (or a copy with copy=True), annotated {ret!r}"
    if name in TRAINERS:
        assert "key_added" in params, f"trainer {name} needs key_added"
        assert "copy" not in params, f"trainer {name} must not take copy"
    if name in GETTERS:
        assert "copy" not in params, f"getter {name} writes nothing, so takes no copy"


def test_import_is_light():
    """``import cellsymphony`` must not import torch, timm, scanpy, squidpy or spatialdata."""
    code = (
        "import sys, cellsymphony\n"
        "heavy = [m for m in ('torch', 'timm', 'scanpy', 'squidpy', 'spatialdata', 'dask.distributed') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing cellsymphony imported {out.stdout.strip()}"
