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


# the naming table of docs/contributing.md: one concept, one parameter name across the public API
NAMING_TABLE = {
    "n_neighs": "n_neighbors",
    "n_neighbours": "n_neighbors",
    "cell_id_col": "id_key",
    "id_col": "id_key",
    "label_col": "label_key",
    "class_key": "label_key",
    "label": "label_key",
    "x": "x_key",
    "y": "y_key",
    "modality": "mod",
}
# parameters that keep a name of the table for a reason: a plotting axis value, a new modality's name
NAMING_EXCEPTIONS = {("tl.predict_expression", "modality")}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_parameter_names_follow_the_naming_table(name):
    for p in inspect.signature(FUNCTIONS[name]).parameters:
        if p in NAMING_TABLE and (name, p) not in NAMING_EXCEPTIONS:
            pytest.fail(f"{name}: parameter {p!r} should be called {NAMING_TABLE[p]!r} (docs/contributing.md)")


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("tl.spatial_coherence", "n_neighs", "n_neighbors"),
        ("pp.import_labels", "cell_id_col", "id_key"),
        ("pp.import_labels", "label_col", "label_key"),
        ("pp.transfer_nucleus_labels", "label", "label_key"),
        ("pp.transfer_nucleus_labels", "x", "x_key"),
        ("io.read_he_cells", "class_key", "label_key"),
        ("io.read_he_cells", "y", "y_key"),
    ],
)
def test_renamed_parameters_still_work_with_a_warning(name, old, new):
    func = FUNCTIONS[name]
    assert func.renamed_parameters[old] == new
    assert new in inspect.signature(func).parameters and old not in inspect.signature(func).parameters
    seen = {}

    def inner(*args, **kwargs):
        seen.update(kwargs)

    from cellsymphony._validate import renamed_parameters

    wrapped = renamed_parameters(**{old: new})(inner)
    with pytest.warns(FutureWarning, match=rf"{old}=\.\.\.\) is deprecated.*write {new}="):
        wrapped(None, **{old: 1})
    assert seen == {new: 1}
    with pytest.raises(TypeError, match=rf"both {old}="):
        wrapped(None, **{old: 1, new: 2})


@pytest.mark.parametrize("name", sorted(n for n in FUNCTIONS if n.startswith("pl.")))
def test_plot_parameters_share_one_text(name):
    """ax / show / save are described once (cellsymphony._docs) for every plotting function."""
    from cellsymphony._docs import DOC_PARAMS

    doc = FUNCTIONS[name].__doc__
    params = inspect.signature(FUNCTIONS[name]).parameters
    for p in ("ax", "show"):
        if p in params:
            assert DOC_PARAMS[p] in doc, f"{name}: {p} is not described by the shared text"
    assert "Path to save the figure to, or ``True`` for ``figures/" in doc
